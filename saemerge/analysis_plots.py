"""The plots of `saemerge analyze`: one histogram per measure (see analyze.py), written as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .analyze import THRESHOLDS


def plot_comparison(result: dict, folder: Path) -> None:
    """Write the PNGs named in result["plots"] into `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = result["a"]["name"], result["b"]["name"]
    data = result["per_latent"]

    def bins(*values: np.ndarray) -> np.ndarray:  # 0..1, or -1..1 when some cosine is negative
        return np.linspace(-1 if min(v.min() for v in values) < 0 else 0, 1, 81)

    def save(fig, ax, name: str, xlabel: str, title: str) -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel("latents")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / result["plots"][name], dpi=100)
        plt.close(fig)

    if "max_cosine" in result["plots"]:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        edges = bins(data["max_cosine_a"], data["max_cosine_b"])
        m = result["mmcs"]
        for key, label, mmcs, chance in [("max_cosine_a", f"{a} -> {b}", m["a_to_b"], m["chance_a_to_b"]),
                                         ("max_cosine_b", f"{b} -> {a}", m["b_to_a"], m["chance_b_to_a"])]:
            *_, patches = ax.hist(data[key], bins=edges, histtype="step", linewidth=1.5,
                                  label=f"{label} (MMCS {mmcs:.3f})")
            ax.axvline(chance, color=patches[0].get_edgecolor(), linestyle="--", linewidth=1)
        ax.plot([], [], color="grey", linestyle="--", label="MMCS of random directions")
        save(fig, ax, "max_cosine", "best decoder cosine with any latent of the other",
             "max cosine of each latent's decoder direction")

    if "matched_cosine" in result["plots"]:
        m = result["matching"]
        edges = bins(data["matched_cosine"], *([data["aligned_cosine"]] if "aligned_cosine" in data else []))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.hist(data["matched_cosine"], bins=edges, alpha=0.6,
                label=f"Hungarian pairs ({m['pairs']}, mean {m['mean_cosine']:.3f})")
        if "aligned_cosine" in data:
            ax.hist(data["aligned_cosine"], bins=edges, histtype="step", linewidth=1.5, color="black",
                    label=f"latent i vs latent i (mean {result['aligned_cosine']['mean']:.3f})")
        for t in THRESHOLDS:
            ax.axvline(t, color="grey", linestyle=":", linewidth=1)
        how = "exact" if m["method"] == "exact" else f"over {m['candidates']} nearest partners"
        save(fig, ax, "matched_cosine", "decoder cosine of the pair",
             f"one-to-one matching of {a} and {b} (Hungarian, {how})")

    if "relative_norm" in result["plots"]:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        rel = data["relative_norm"]
        live = rel[~np.isnan(rel)]
        ax.hist(live, bins=np.linspace(0, 1, 52), label=f"{len(live)} latents")  # 51 bins: one centred on 0.5
        save(fig, ax, "relative_norm", f"|d_{a}| / (|d_{a}| + |d_{b}|)",
             f"relative decoder norm per latent (0: {b}'s alone, 0.5: shared, 1: {a}'s alone)")
