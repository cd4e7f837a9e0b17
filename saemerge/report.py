"""The human-readable end of a merge: report.md and a plot of training."""

from __future__ import annotations

import json
from pathlib import Path

from .evaluate import results_table
from .files import write_atomic
from .recipe import Recipe


def plot_training(log_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    tokens = [r["tokens"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, title in zip(axes, ("recon", "align", "total"),
                              ("reconstruction (sum of FVU)", "alignment (1 - code cosine)", "total loss")):
        ax.plot(tokens, [r[key] for r in rows])
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def sae_table(metrics: dict) -> str:
    lines = ["| source | explained variance | L0 | dead latents |", "|---|---|---|---|"]
    for name, m in metrics["sources"].items():
        lines.append(f"| {name} | {m['explained_variance']:.3f} | {m['l0']:.1f} | {m['dead_fraction']:.1%} |")
    lines += ["", "| pair | cross explained variance | code cosine | active-set Jaccard |", "|---|---|---|---|"]
    for pair, m in metrics["pairs"].items():
        lines.append(f"| {pair} | {m['cross_explained_variance']:.3f} | {m['code_cosine']:.3f} | {m['active_jaccard']:.3f} |")
    return "\n".join(lines)


def write_report(folder: Path, recipe: Recipe, metrics: dict, results: dict | None) -> str:
    sources = ", ".join(f"`{s.name}` ({s.model}, layer {s.layer})" for s in recipe.models)
    m = recipe.merge
    text = [
        f"# {recipe.name}",
        "",
        f"Sources: {sources}. Heads: `{m.heads}`, target `{m.target}`, combine `{m.combine}`, scale {m.scale}, "
        f"gates {m.gates or 'none'}.",
        f"Latent: {recipe.latent.size} {recipe.latent.activation} latents; trained {metrics['steps']} steps on "
        f"{metrics['train_tokens']:,} tokens; measured on {metrics['sites'][0]['tokens']:,} held-back tokens.",
        "",
        "## Sparse autoencoders",
        "",
    ]
    for site in metrics["sites"]:
        if len(metrics["sites"]) > 1:
            text += ["Layers: " + ", ".join(f"{name} `{path}`" for name, path in site["layers"].items()), ""]
        text += [sae_table(site), ""]
    text += ["![training](training_curves.png)", ""]
    calibration = metrics.get("calibration")
    if calibration:
        text += ["## Calibration", "",
                 f"{calibration['steps']} steps; next-token loss on a held-back batch of the training mixture "
                 f"{calibration['held_back_loss_before']:.4f} -> {calibration['held_back_loss_after']:.4f}.", ""]
    if results:
        text += ["## Evaluation (lm-evaluation-harness)", "", results_table(results), ""]
    timings = metrics.get("timings", {})
    if timings:
        text += ["## Wall time", "", " · ".join(f"{k} {v:.1f}s" for k, v in timings.items()), ""]
    report = "\n".join(text)
    write_atomic(folder / "report.md", report)
    return report
