"""`saemerge features split`: feature splitting across dictionaries of growing size at the same sites.

Each live feature of a larger dictionary gets as parent the live feature of the next smaller one with the nearest
decoder direction (highest cosine); the parents and their children form trees from the smallest dictionary to the
largest. A parent with two or more children at cosine >= `threshold` has split: the larger dictionary holds finer
versions of it (Bricken et al., towards monosemanticity, 2023). A parent with no child was dropped or merged into
another feature; a child whose best parent is below the threshold is new at that size. Dictionaries trained with
the same train.seed start from the same tokens' directions (latent j of each is token j of one draw), so their
trees partly record a shared start ("same_index": children whose parent has their own index); train sizes with
different seeds to see splitting alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .analyze import _scan, _unit_rows
from .errors import UserError
from .feature_evolution import THRESHOLD
from .feature_sample import TOKENS, encode, fire_counts, live_part, load, sample_activations, top_snippets
from .files import refuse_existing, write_results

EXAMPLES = 3  # splits shown per site, with snippets


def parents(small, large) -> tuple[np.ndarray, np.ndarray]:
    """For each latent of SAE `large`, the latent of SAE `small` with the nearest decoder direction, and the
    cosine: (indices, cosines), a block of rows at a time (analyze._scan)."""
    (cos, idx), _ = _scan(_unit_rows(large), _unit_rows(small), 1)
    return idx[:, 0].numpy(), cos[:, 0].numpy()


def split_stats(parent: np.ndarray, cosine: np.ndarray, n_parents: int, threshold: float) -> dict:
    children = np.bincount(parent, minlength=n_parents)
    close = np.bincount(parent[cosine >= threshold], minlength=n_parents)
    return {"parents": n_parents, "children": len(parent), "mean_cosine": float(cosine.mean()),
            "children_above_threshold": float((cosine >= threshold).mean()),
            "parents_with": {"0": int((children == 0).sum()), "1": int((children == 1).sum()),
                             "2+": int((children >= 2).sum())},
            "split_parents": int((close >= 2).sum()), "max_children": int(children.max())}


def feature_splitting(folders: list[str | Path], threshold: float = THRESHOLD, tokens: int = TOKENS, data=None,
                      output: str | Path | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Match the dictionaries of train-saes `folders` (one model, two or more sizes; any order) at every site they
    share, smaller to larger. Live features: those firing on `tokens` tokens of `data` (tokens=0: all; no
    snippets). With `output`, write split.json, trees.json, split.md and split.png into that new folder."""
    if len(folders) < 2:
        raise UserError(f"FOLDERS: {len(folders)} given; expected two or more train-saes folders of growing size")
    if not 0 < threshold < 1:
        raise UserError(f"--threshold: {threshold}; expected a cosine between 0 and 1")
    refuse_existing(output, overwrite)
    dicts = sorted((load(f, "FOLDERS") for f in folders), key=lambda d: d.saes[0].cfg.d_sae)
    sizes = [d.saes[0].cfg.d_sae for d in dicts]
    if len(set(sizes)) < len(sizes):
        raise UserError(f"FOLDERS: sizes {sizes}; expected dictionaries of different sizes")
    if len({d.spec.model for d in dicts}) > 1:
        raise UserError(f"FOLDERS: models {[d.spec.model for d in dicts]}; expected dictionaries of one model")
    paths = [p for p in dicts[0].paths if all(p in d.paths for d in dicts)]
    if not paths:
        raise UserError(f"FOLDERS: no site in all of them; expected the same module paths ({dicts[0].paths})")
    sites = [dicts[0].paths.index(p) for p in paths]
    sample = sample_activations(dicts[0], sites, tokens, data, progress) if tokens else None
    report = {"folders": [str(d.folder) for d in dicts], "sizes": sizes, "threshold": threshold, "tokens": tokens,
              "sites": {}}
    trees = {}
    for s, path in zip(sites, paths):
        saes = [d.saes[d.paths.index(path)] for d in dicts]
        x = sample.acts[s] if sample else None
        masks = [fire_counts(sae, x) > 0 if sample else torch.ones(sae.cfg.d_sae, dtype=torch.bool) for sae in saes]
        live = [torch.nonzero(mask).squeeze(1) for mask in masks]
        parts = [live_part(sae, mask) for sae, mask in zip(saes, masks)]
        steps, links = [], []
        for i in range(len(saes) - 1):
            parent, cosine = parents(parts[i], parts[i + 1])
            links.append((parent, cosine))
            steps.append({"from": sizes[i], "to": sizes[i + 1], **split_stats(parent, cosine, len(live[i]), threshold),
                          # Dictionaries of one train.seed start latent j as the same token: a child with its
                          # parent's index may only have kept its initial direction.
                          "same_index": float((live[i][torch.from_numpy(parent)] == live[i + 1]).float().mean())})
        trees[path] = _trees(live, links)
        report["sites"][path] = {"live": [len(k) for k in live], "steps": steps,
                                 "examples": _examples(sample, x, saes, live, links, threshold) if sample else []}
    if output is not None:
        write_results(output, overwrite, "split", report, summary(report), plot, trees=trees)
    return report


def _trees(live: list[torch.Tensor], links: list[tuple[np.ndarray, np.ndarray]]) -> list[dict]:
    """Nested {"latent", "cosine" (with its parent), "children"}, one tree per live latent of the smallest
    dictionary; built from the largest dictionary up."""
    below = [[] for _ in range(len(live[-1]))]
    for level in reversed(range(len(links))):
        parent, cosine = links[level]
        nodes = [[] for _ in range(len(live[level]))]
        for child, (p, c) in enumerate(zip(parent, cosine)):
            nodes[p].append({"latent": int(live[level + 1][child]), "cosine": round(float(c), 3),
                             "children": below[child]})
        below = nodes
    return [{"latent": int(live[0][i]), "children": below[i]} for i in range(len(live[0]))]


def _examples(sample, x: torch.Tensor, saes, live, links, threshold: float) -> list[dict]:
    """The smallest dictionary's parents with the most children at cosine >= threshold in the next one, each
    with its children and their top snippets."""
    parent, cosine = links[0]
    close = np.bincount(parent[cosine >= threshold], minlength=len(live[0]))
    chosen = [p for p in np.argsort(-close, kind="stable")[:EXAMPLES] if close[p] >= 2]
    codes = [encode(sae, x) for sae in saes[:2]] if chosen else []
    examples = []
    for p in chosen:
        latent = int(live[0][p])
        examples.append({"parent": {"latent": latent, "snippets": top_snippets(sample, codes[0], latent)},
                         "children": [{"latent": int(live[1][k]), "cosine": round(float(cosine[k]), 3),
                                       "snippets": top_snippets(sample, codes[1], int(live[1][k]))}
                                      for k in np.flatnonzero((parent == p) & (cosine >= threshold))]})
    return examples


def summary(report: dict) -> str:
    t = report["threshold"]
    lines = [f"# Feature splitting across dictionaries of sizes {report['sizes']}", "",
             f"Each live feature of a larger dictionary has as parent the smaller one's nearest decoder direction; "
             f"a parent splits when two or more children reach cosine {t}.", "",
             "| site | sizes | live | mean cosine to parent | children >= threshold | parents with 0 / 1 / 2+ "
             "children | split parents | most children | child has its parent's index |",
             "|---|---|---|---|---|---|---|---|---|"]
    for path, site in report["sites"].items():
        for st, (a, b) in zip(site["steps"], zip(site["live"], site["live"][1:])):
            w = st["parents_with"]
            lines.append(f"| `{path}` | {st['from']} -> {st['to']} | {a} -> {b} | {st['mean_cosine']:.3f} | "
                         f"{st['children_above_threshold']:.1%} | {w['0']} / {w['1']} / {w['2+']} | "
                         f"{st['split_parents']} | {st['max_children']} | {st['same_index']:.1%} |")
    lines.append("")
    small, large = report["sizes"][:2]
    for path, site in report["sites"].items():
        if site["examples"]:
            lines += [f"## Splits at `{path}` ({small} -> {large} latents)", ""]
        for e in site["examples"]:
            lines.append(f"- {small}:{e['parent']['latent']} {_shown(e['parent']['snippets'])}")
            lines += [f"  - {large}:{c['latent']} (cosine {c['cosine']:.2f}) {_shown(c['snippets'])}"
                      for c in e["children"]]
        if site["examples"]:
            lines.append("")
    return "\n".join(lines)


def _shown(snippets: list[str]) -> str:
    return " · ".join(f"`{s}`" for s in snippets) or "(no example)"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(report["sites"])
    steps = [f"{st['from']}->{st['to']}" for st in report["sites"][names[0]]["steps"]]
    width = 0.8 / len(steps)
    for i, step in enumerate(steps):
        x = np.arange(len(names)) + (i - (len(steps) - 1) / 2) * width
        stats = [report["sites"][n]["steps"][i] for n in names]
        left.bar(x, [st["split_parents"] / st["parents"] for st in stats], width, label=step)
        right.bar(x, [st["mean_cosine"] for st in stats], width, label=step)
    for ax, title in ((left, f"parents with 2+ children at cosine >= {report['threshold']}"),
                      (right, "mean cosine child-parent")):
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    left.set_ylabel("fraction of the smaller dictionary's live features")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
