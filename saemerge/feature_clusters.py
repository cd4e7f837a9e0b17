"""`saemerge features clusters`: clusters of one site's features, by decoder direction and by co-activation.

Both clusterings are average-linkage (scipy) on a distance 1 - similarity, cut into the same number of clusters
so that they can be compared (adjusted Rand index, scikit-learn: 1 the same partition, 0 what random labels give):
- decoder: the cosine of two features' decoder rows;
- co-activation: phi, the correlation of two features' firing (0/1 per token of a sample).
Average linkage rather than Ward's: most pairs of sparse features have phi near 0, and Ward's then lumps a third of
them into one cluster correlated with nothing (zoo h.2, 87 clusters: Ward's largest holds 504 of 1396 features and
pairs within a cluster have mean phi 0.008; average linkage: the largest 102, mean phi 0.069). Only features that
fire at least `min_fires` times are clustered (a correlation needs some firing to mean anything). The largest
clusters are listed with a few members' top-activating snippets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from sklearn.metrics import adjusted_rand_score

from .dictionaries import Dictionaries
from .errors import UserError
from .feature_sample import TOKENS, encode, sample_activations, site_index, top_snippets
from .files import refuse_existing, write_results

PER_CLUSTER = 16  # default number of clusters: live features / 16
MIN_FIRES = 3


def average_clusters(similarity: np.ndarray, n_clusters: int) -> np.ndarray:
    """Labels 0..n_clusters-1 of the average-linkage clustering of items with pairwise `similarity` (cosine or
    correlation)."""
    distance = np.clip(1 - similarity, 0, None)
    np.fill_diagonal(distance, 0)
    tree = linkage(squareform(distance, checks=False), method="average")
    return fcluster(tree, n_clusters, criterion="maxclust") - 1


def firing_correlation(fires: torch.Tensor) -> np.ndarray:
    """phi: the correlation of the 0/1 firing columns of `fires` [tokens, features]."""
    x = fires.float()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    return ((x.T @ x) / (len(x) - 1)).numpy().astype(np.float64)


def mean_within(similarity: np.ndarray, members: np.ndarray) -> float | None:
    """The mean similarity of the pairs of distinct `members`; None for a single one."""
    if len(members) < 2:
        return None
    block = similarity[np.ix_(members, members)]
    return float((block.sum() - np.trace(block)) / (len(members) * (len(members) - 1)))


def feature_clusters(dicts: Dictionaries, site: int | str = -1, clusters: int | None = None, tokens: int = TOKENS,
                     data=None, top: int = 8, members: int = 4, snippets: int = 2, min_fires: int = MIN_FIRES,
                     output: str | Path | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Cluster the features of `site` (index or module path; default the last) by decoder cosine and by
    co-activation on `tokens` tokens of `data` into `clusters` clusters each (default: one per 16 live features);
    list the `top` largest clusters of each with `members` members' `snippets` top snippets. With `output`, write
    clusters.json, clusters.md and clusters.png into that new folder."""
    if clusters is not None and (not isinstance(clusters, int) or clusters < 2):
        raise UserError(f"--clusters: {clusters}; expected a whole number of at least 2")
    for arg, value in (("--top", top), ("--members", members)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{arg}: {value}; expected a positive whole number")
    refuse_existing(output, overwrite)
    s = site_index(dicts, site)
    sample = sample_activations(dicts, [s], tokens, data, progress)
    codes = encode(dicts.saes[s], sample.acts[s])
    fires = codes > 0
    live = torch.nonzero(fires.sum(0) >= min_fires).squeeze(1)
    n = clusters or max(2, len(live) // PER_CLUSTER)
    if len(live) <= n:
        raise UserError(f"--clusters: {n}; expected fewer than the {len(live)} features firing {min_fires}+ times "
                        f"at {dicts.paths[s]} (or more --tokens)")
    rows = torch.nn.functional.normalize(dicts.saes[s].W_dec.detach().float()[live], dim=-1)
    cosine = (rows @ rows.T).numpy().astype(np.float64)
    phi = firing_correlation(fires[:, live])
    labels = {"decoder": average_clusters(cosine, n), "coactivation": average_clusters(phi, n)}
    rate = fires[:, live].float().mean(0)

    def describe(label: np.ndarray) -> list[dict]:
        sizes = np.bincount(label, minlength=n)
        listed = []
        for c in np.argsort(-sizes, kind="stable")[:top]:
            inside = np.flatnonzero(label == c)
            chosen = inside[np.argsort(-rate[inside].numpy(), kind="stable")[:members]]
            listed.append({"size": int(sizes[c]), "mean_decoder_cosine": mean_within(cosine, inside),
                           "mean_firing_correlation": mean_within(phi, inside),
                           "members": [{"latent": int(live[i]), "firing_rate": float(rate[i]),
                                        "snippets": top_snippets(sample, codes, int(live[i]), snippets)}
                                       for i in chosen]})
        return listed

    report = {"folder": str(dicts.folder), "site": dicts.paths[s], "latents": dicts.saes[s].cfg.d_sae,
              "tokens": len(codes), "min_fires": min_fires, "clustered": len(live), "clusters": n,
              "adjusted_rand_index": float(adjusted_rand_score(labels["decoder"], labels["coactivation"])),
              "largest": {k: describe(v) for k, v in labels.items()},
              "sizes": {k: sorted(np.bincount(v, minlength=n).tolist(), reverse=True) for k, v in labels.items()},
              "labels": {k: {int(live[i]): int(c) for i, c in enumerate(v)} for k, v in labels.items()}}
    if output is not None:
        write_results(output, overwrite, "clusters", report, summary(report), plot)
    return report


def summary(report: dict) -> str:
    lines = [f"# Feature clusters at `{report['site']}` of `{report['folder']}`", "",
             f"{report['clustered']} of {report['latents']} features (those firing {report['min_fires']}+ times on "
             f"{report['tokens']} tokens) in {report['clusters']} clusters each way (average linkage); agreement of the two "
             f"clusterings: adjusted Rand index {report['adjusted_rand_index']:.3f} (0: chance, 1: the same).", ""]
    for kind, title in (("decoder", "by decoder cosine"), ("coactivation", "by co-activation (phi of firing)")):
        lines += [f"## Largest clusters {title}", ""]
        for n, c in enumerate(report["largest"][kind]):
            cos, phi = c["mean_decoder_cosine"], c["mean_firing_correlation"]
            lines.append(f"- cluster {n + 1}: {c['size']} features" + (
                f", mean decoder cosine {cos:.2f}, mean firing correlation {phi:.2f}" if cos is not None else ""))
            for m in c["members"]:
                shown = " · ".join(f"`{s}`" for s in m["snippets"]) or "(no example)"
                lines.append(f"  - {m['latent']} (fires on {m['firing_rate']:.2%}): {shown}")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for kind, label in (("decoder", "by decoder cosine"), ("coactivation", "by co-activation")):
        ax.plot(range(1, report["clusters"] + 1), report["sizes"][kind], marker=".", label=label)
    ax.set_xlabel("cluster, largest first")
    ax.set_ylabel("features")
    ax.set_yscale("log")
    ax.set_title(f"{report['site']}: cluster sizes (adjusted Rand index {report['adjusted_rand_index']:.2f})",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
