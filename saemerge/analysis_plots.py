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

    if "activations" in result:
        plot_activations(result, folder)


def plot_activations(result: dict, folder: Path) -> None:
    """The plots of the activation measures (activation_measures.py) named in result["plots"]."""
    import matplotlib.pyplot as plt

    a, b = result["a"]["name"], result["b"]["name"]
    r, data = result["activations"], result["per_latent"]["activations"]
    plots = result["plots"]

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / plots[name], dpi=100)
        plt.close(fig)

    if "firing_rate" in plots:
        fig, axes = plt.subplots(1, 2 if "rate_share" in data else 1, figsize=(11 if "rate_share" in data else 7, 3.8),
                                 squeeze=False)
        floor = 0.5 / r["tokens"]  # a latent that never fires, drawn at half of one token's rate
        ra, rb = np.maximum(data["rate_a"], floor), np.maximum(data["rate_b"], floor)
        ax = axes[0, 0]
        if "rate_share" in data:  # aligned: latent i in A against latent i in B
            ax.scatter(ra, rb, s=4, alpha=0.4)
            top = max(ra.max(), rb.max())
            for ratio, style in ((1, "-"), (r["firing"]["one_sided"] / (1 - r["firing"]["one_sided"]), "--")):
                ax.plot([floor, top], [floor / ratio, top / ratio], "k" + style, linewidth=0.8)
                ax.plot([floor, top / ratio], [floor * ratio, top], "k" + style, linewidth=0.8)
            ax.set_xscale("log"), ax.set_yscale("log")
            ax.set_xlabel(f"firing rate in {a}"), ax.set_ylabel(f"firing rate in {b}")
            ax.set_title(f"latent i in {a} vs in {b} (dashed: 9x; never fired: at {floor:.1e})", fontsize=9)
            share = data["rate_share"][~np.isnan(data["rate_share"])]
            f = r["firing"]
            axes[0, 1].hist(share, bins=np.linspace(0, 1, 41))
            for t in (1 - f["one_sided"], f["one_sided"]):
                axes[0, 1].axvline(t, color="black", linestyle="--", linewidth=0.8)
            axes[0, 1].set_xlabel(f"rate share f_{a} / (f_{a} + f_{b})"), axes[0, 1].set_ylabel("latents")
            axes[0, 1].set_title(f"{f['b_only']:.1%} {b}'s alone | {f['shared']:.1%} shared | {f['a_only']:.1%} "
                                 f"{a}'s alone", fontsize=9)
        else:
            edges = np.logspace(np.log10(floor) - 0.1, 0, 50)
            ax.hist(ra, bins=edges, histtype="step", linewidth=1.5, label=a)
            ax.hist(rb, bins=edges, histtype="step", linewidth=1.5, label=b)
            ax.set_xscale("log"), ax.set_xlabel("firing rate"), ax.set_ylabel("latents"), ax.legend(fontsize=8)
            ax.set_title(f"firing rate per latent (never fired: at {floor:.1e})", fontsize=9)
        for ax in axes.flat:
            ax.grid(alpha=0.3)
        save(fig, "firing_rate")

    if "activation_matching" in plots:
        m = r["matching"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        edges = np.linspace(min(-0.1, float(data["matched_corr"].min())), 1, 56)
        ax.hist(data["matched_corr"], bins=edges, alpha=0.6, label=f"Hungarian pairs ({m['pairs']}, mean "
                                                                    f"{m['mean_matched']:.3f})")
        ax.hist(data["max_corr_a"], bins=edges, histtype="step", linewidth=1.5,
                label=f"max over {b}, per latent of {a} (mean {m['mmc_a_to_b']:.3f})")
        if "diagonal_corr" in data:
            ax.hist(data["diagonal_corr"], bins=edges, histtype="step", linewidth=1.5, color="black",
                    label=f"latent i vs latent i (mean {m['diagonal_mean']:.3f})")
        for t in (0.5, 0.7, 0.9):
            ax.axvline(t, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("Pearson correlation of the activations over the tokens"), ax.set_ylabel("latents")
        ax.set_title(f"activation matching of {a} and {b} (latents firing >= {r['min_fires']} times)", fontsize=10)
        ax.grid(alpha=0.3), ax.legend(fontsize=8)
        save(fig, "activation_matching")

    if "cofiring" in plots:
        c = r["cofiring"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.hist(data["jaccard"], bins=np.linspace(0, 1, 51), label=f"{c['fired']} pairs, mean {c['mean_jaccard']:.3f}")
        ax.axvline(c["chance"], color="black", linestyle="--", linewidth=1,
                   label=f"independent firing: {c['chance']:.3f}")
        ax.set_xlabel("Jaccard of the token sets where the two fire"), ax.set_ylabel("pairs")
        ax.set_title(f"co-firing of {c['pairs']}", fontsize=10)
        ax.grid(alpha=0.3), ax.legend(fontsize=8)
        save(fig, "cofiring")

    if "cross" in plots:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, (key, src, dst) in zip(axes, (("a->b", a, b), ("b->a", b, a))):
            x = r["cross"][key]
            labels = [f"{dst} clean", f"{dst}'s own SAE", f"{src}'s code,\n{dst}'s SAE", f"{dst} mean-ablated"]
            values = [x["ce_clean"], x["ce_own"], x["ce_cross"], x["ce_mean"]]
            bars = ax.bar(labels, values, color=["tab:green", "tab:blue", "tab:orange", "tab:grey"])
            ax.bar_label(bars, fmt="%.3f", fontsize=8)
            rec = "n/a" if x["ce_recovered"] is None else f"{x['ce_recovered']:.1%}"
            ax.set_title(f"model {dst}: CE recovered {rec}, EV {x['explained_variance']:.3f} (own SAE "
                         f"{x['own_explained_variance']:.3f})", fontsize=9)
            ax.set_ylabel("next-token CE (nats)"), ax.tick_params(axis="x", labelsize=8)
            ax.set_ylim(min(values) * 0.9, max(values) * 1.05)
        save(fig, "cross")

    if "latent_map" in plots:
        lm = r["latent_map"]
        nz = data["map_nonzeros"][data["map_rows_fired"]]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.hist(nz, bins=np.arange(0, max(int(nz.max()) if len(nz) else 1, 1) + 2) - 0.5,
                label=f"{lm['rows']} rows, mean {lm['nonzeros_per_row']:.2f}")
        ax.set_xlabel(f"weights above {lm['threshold']} in the row of a latent of {a}"), ax.set_ylabel("latents")
        ax.set_title(f"latent map {a} -> {b}: held-out explained variance {lm['fit']:.3f}", fontsize=10)
        ax.grid(alpha=0.3), ax.legend(fontsize=8)
        save(fig, "latent_map")
