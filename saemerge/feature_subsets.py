"""`saemerge features subset`: dictionaries trained on a subset D' of the data against dictionaries trained on D.

At every site the folders share, on activations of D's data (`data`: pass held-out text):
- is D' a subset: the fraction of D''s live features with a twin in D (nearest decoder cosine >= threshold), and
  the fraction paired one-to-one at that cosine (Hungarian matching, analyze.compare_saes);
- what D' misses: the fraction of D's live features with no twin in D';
- do D' features generalise to D: explained variance, L0 and dead fraction of both on D's data (metrics.measure).
A control folder (trained on D again, with another train.seed: other initial latents and data order) gives the
same numbers for two dictionaries of the same data: the noise floor. D' is as close to D as a reseeded D is when
its numbers reach the control's; without a control, nothing separates "D' learned other features" from "two
trainings never agree on more than this".
"""

from __future__ import annotations

from pathlib import Path

import torch

from .analyze import compare_saes
from .errors import UserError
from .feature_evolution import THRESHOLD
from .feature_sample import TOKENS, fire_counts, live_part, load, sample_activations
from .files import refuse_existing, write_results
from .metrics import measure

BATCH = 4096  # tokens per batch of metrics.measure


def twins(other, full, threshold: float) -> dict:
    """How far the features of SAE `other` are found in SAE `full` (both restricted to their live latents)."""
    m = compare_saes(other, full)
    pl = m["per_latent"]
    return {"in_full": float((pl["max_cosine_a"] >= threshold).mean()),
            "one_to_one": float((pl["matched_cosine"] >= threshold).sum() / other.cfg.d_sae),
            "full_without": float((pl["max_cosine_b"] < threshold).mean()),
            "mmcs": m["mmcs"]["a_to_b"], "matched_mean_cosine": m["matching"]["mean_cosine"]}


def quality(sae, x: torch.Tensor) -> dict:
    measured = measure({"sae": sae}, ({"sae": x[i:i + BATCH]} for i in range(0, len(x), BATCH)))["sources"]["sae"]
    return {k: float(v) for k, v in measured.items()}


def feature_subsets(subset: str | Path, full: str | Path, control: str | Path | None = None,
                    threshold: float = THRESHOLD, tokens: int = TOKENS, data=None, output: str | Path | None = None,
                    overwrite: bool = False, progress: bool = True) -> dict:
    """Compare train-saes folders `subset` (trained on D') and `full` (on D), and `control` (D, another seed) if
    given, site by site on `tokens` tokens of `data` (default: `full`'s recipe data; see the module docstring).
    With `output`, write subset.json, subset.md and subset.png into that new folder."""
    if not 0 < threshold < 1:
        raise UserError(f"--threshold: {threshold}; expected a cosine between 0 and 1")
    refuse_existing(output, overwrite)
    folders = {"subset": load(subset, "SUBSET"), "full": load(full, "FULL")}
    if control is not None:
        folders["control"] = load(control, "--control")
    models = {name: d.spec.model for name, d in folders.items()}
    if len(set(models.values())) > 1:
        raise UserError(f"SUBSET: models {models}; expected dictionaries of one model")
    paths = [p for p in folders["full"].paths if all(p in d.paths for d in folders.values())]
    if not paths:
        raise UserError(f"SUBSET: no site in common with FULL's {folders['full'].paths}; expected the same sites")
    sites = [folders["full"].paths.index(p) for p in paths]
    sample = sample_activations(folders["full"], sites, tokens, data, progress)
    report = {"folders": {name: str(d.folder) for name, d in folders.items()}, "threshold": threshold,
              "tokens": len(next(iter(sample.acts.values()))),
              "data": None if data is None or hasattr(data, "seq_len") else str(data), "sites": {}}
    for s, path in zip(sites, paths):
        x = sample.acts[s]
        saes = {name: d.saes[d.paths.index(path)] for name, d in folders.items()}
        live = {name: live_part(sae, fire_counts(sae, x) > 0) for name, sae in saes.items()}
        site = {"latents": {name: sae.cfg.d_sae for name, sae in saes.items()},
                "live": {name: part.cfg.d_sae for name, part in live.items()},
                "quality": {name: quality(sae, x) for name, sae in saes.items()},
                "subset_vs_full": twins(live["subset"], live["full"], threshold)}
        if control is not None:
            site["control_vs_full"] = twins(live["control"], live["full"], threshold)
        report["sites"][path] = site
    if output is not None:
        write_results(output, overwrite, "subset", report, summary(report), plot)
    return report


def summary(report: dict) -> str:
    f, t = report["folders"], report["threshold"]
    control = "control" in f
    lines = ["# Dictionaries of a data subset D' against D", "",
             f"D': `{f['subset']}`; D: `{f['full']}`"
             + (f"; control (D, another seed): `{f['control']}`" if control else
                "; no control (D with another seed), so no noise floor")
             + f"; measured on {report['tokens']} tokens of " + (f"`{report['data']}`" if report["data"] else "D's data")
             + f"; twins at decoder cosine >= {t}.", "",
             "| site | D' features with a twin in D | one-to-one | D features with no twin in D' | "
             "explained variance D' / D" + (" / control" if control else "") + " | dead D' / D" +
             (" / control" if control else "") + " |", "|---|---|---|---|---|---|"]
    names = ["subset", "full"] + (["control"] if control else [])

    def cell(s: dict, key: str) -> str:
        return f"{s['subset_vs_full'][key]:.1%}" + (f" (control {s['control_vs_full'][key]:.1%})" if control else "")

    for path, s in report["sites"].items():
        ev = " / ".join(f"{s['quality'][n]['explained_variance']:.3f}" for n in names)
        dead = " / ".join(f"{s['quality'][n]['dead_fraction']:.1%}" for n in names)
        lines.append(f"| `{path}` | {cell(s, 'in_full')} | {cell(s, 'one_to_one')} | {cell(s, 'full_without')} | "
                     f"{ev} | {dead} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["sites"])
    pairs = [("subset_vs_full", "D' vs D")] + ([("control_vs_full", "control vs D")]
                                               if "control" in report["folders"] else [])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(pairs)
    for i, (key, label) in enumerate(pairs):
        x = np.arange(len(names)) + (i - (len(pairs) - 1) / 2) * width
        left.bar(x, [report["sites"][n][key]["in_full"] for n in names], width, label=f"{label}: twin in D")
        left.scatter(x, [1 - report["sites"][n][key]["full_without"] for n in names], color="k", marker="_",
                     s=200, zorder=3, label="dash: D's features with a twin in it" if i == 0 else None)
    sources = ["subset", "full"] + (["control"] if "control" in report["folders"] else [])
    width = 0.8 / len(sources)
    for i, name in enumerate(sources):
        x = np.arange(len(names)) + (i - (len(sources) - 1) / 2) * width
        right.bar(x, [report["sites"][n]["quality"][name]["explained_variance"] for n in names], width,
                  label={"subset": "D'", "full": "D", "control": "control"}[name])
    for ax, title in ((left, f"features with a twin at cosine >= {report['threshold']}"),
                      (right, "explained variance on D's data")):
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, ncol=2)
    left.set_ylim(0, 1.25)  # room for the legend
    low = min(report["sites"][n]["quality"][s]["explained_variance"] for n in names for s in sources)
    right.set_ylim(max(0.0, low - 0.05), 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
