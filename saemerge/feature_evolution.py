"""`saemerge features evolution`: features followed from one residual site to the next of a dictionaries folder.

Each residual site's live features are matched one-to-one to the previous residual site's (Hungarian on decoder
cosine, analyze.compare_saes); a pair at cosine >= `threshold` is the same feature carried on. Chains of such pairs
give each feature the site where it first appears and how many residual sites it lasts. A feature with no partner
at the previous site is new there; if the dictionaries hold what the block in between writes (its attention and
MLP outputs), the new feature is credited to the one holding its nearest decoder direction, if that cosine reaches
`threshold` too, else to neither.

Threshold 0.7: random directions in the zoo's 256 dimensions reach a best cosine of about 0.3 among 2048 others
(the chance level compare_saes reports, in the JSON); 0.7 is far above it, and it is the middle of compare_saes's
thresholds. Trained dictionaries are not isotropic, so chance is a floor: the seed control of feature_subsets
(two dictionaries of one site that differ only in their seed) says how many real twins reach 0.7.

The trainer starts latent j of every site's SAE as the same token's activation (init: data), and a residual stream
changes little from one block to the next, so a feature carried within one folder may be that shared start rather
than a feature the sites both learned: the report gives the carried pairs that have one index, and with `control`
(the same sites trained with another seed, so another start) the matches from this folder's previous site to the
control's next site, against this folder's site to the control's same site (all that two seeds agree on).

Residual sites are block outputs (a module path ending in a block index: transformer.h.3, model.layers.5); a
block's writes are the sites whose path extends its path, named attention or MLP by their last part (attn,
attention; mlp, feedforward, ffn). Gemma's post_attention_layernorm is the attention write; Llama's module of that
name is the MLP's input norm, not a write: name such sites with `attention` / `mlp` instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .analyze import compare_saes
from .dictionaries import Dictionaries
from .errors import UserError
from .feature_sample import TOKENS, fire_counts, live_part, sample_activations
from .files import refuse_existing, write_results

THRESHOLD = 0.7
KINDS = {"attention": ("attn", "attention"), "mlp": ("mlp", "feedforward", "feed_forward", "ffn")}
ORIGINS = ("carried", "attention", "mlp", "neither", "unattributed")  # unattributed: no dictionary of the writes


def residual_sites(paths: list[str]) -> list[int]:
    return [i for i, p in enumerate(paths) if re.search(r"\.\d+$", p)]


def write_sites(paths: list[str], residual: list[int], attention: list[str] | None = None,
                mlp: list[str] | None = None) -> dict[int, dict[str, list[int]]]:
    """{residual site: {"attention": [sites], "mlp": [sites]}}: the dictionaries of what the block before each
    residual site writes, found by module path, or only those named in `attention` / `mlp`."""
    named = attention is not None or mlp is not None
    kinds = {}
    for kind, given in (("attention", attention), ("mlp", mlp)):
        for path in given or []:
            if path not in paths:
                raise UserError(f"--{kind}: '{path}' is not a site; expected one of {paths}")
            kinds[paths.index(path)] = kind
    if not named:
        for i, path in enumerate(paths):
            last = path.rsplit(".", 1)[-1].lower()
            kind = next((k for k, words in KINDS.items() if any(w in last for w in words)), None)
            if kind and i not in residual:
                kinds[i] = kind
    found = {r: {"attention": [], "mlp": []} for r in residual}
    for i, kind in sorted(kinds.items()):
        block = next((r for r in residual if paths[i].startswith(paths[r] + ".")), None)
        if block is None and not named:
            continue  # a write of a block whose output has no dictionary
        if block is None:
            raise UserError(f"--{kind}: '{paths[i]}' is inside no residual site's block ({[paths[r] for r in residual]});"
                            " expected a module of one of those blocks")
        found[block][kind].append(i)
    return found


def matched(a, b, threshold: float) -> int:
    """Latents of SAEs `a` and `b` paired one-to-one (Hungarian) at decoder cosine >= threshold."""
    return int((compare_saes(a, b)["per_latent"]["matched_cosine"] >= threshold).sum())


def feature_evolution(dicts: Dictionaries, threshold: float = THRESHOLD, attention: list[str] | None = None,
                      mlp: list[str] | None = None, control: Dictionaries | None = None, tokens: int = TOKENS,
                      data=None, output: str | Path | None = None, overwrite: bool = False,
                      progress: bool = True) -> dict:
    """Follow the live features of `dicts` (those firing on `tokens` tokens of `data`; all with tokens=0) across
    its residual sites (see the module docstring); `control`: the same sites trained with another seed. With
    `output`, write evolution.json, evolution.md and evolution.png into that new folder."""
    if not 0 < threshold < 1:
        raise UserError(f"--threshold: {threshold}; expected a cosine between 0 and 1")
    refuse_existing(output, overwrite)
    residual = residual_sites(dicts.paths)
    if len(residual) < 2:
        raise UserError(f"DIR: '{dicts.folder}' has {len(residual)} residual sites (block outputs) in {dicts.paths}; "
                        "expected two or more")
    writes = write_sites(dicts.paths, residual, attention, mlp)
    paths = [dicts.paths[r] for r in residual]
    if control is not None and (control.spec.model != dicts.spec.model or not set(paths) <= set(control.paths)):
        raise UserError(f"--control: '{control.folder}' is not of {dicts.spec.model} at {paths}; expected the same "
                        "model and sites trained with another seed")
    used = residual + [s for w in writes.values() for sites in w.values() for s in sites]
    sample = sample_activations(dicts, used, tokens, data, progress) if tokens else None

    def live(sae, site: int) -> torch.Tensor:
        return fire_counts(sae, sample.acts[site]) > 0 if sample else torch.ones(sae.cfg.d_sae, dtype=torch.bool)

    masks = {s: live(dicts.saes[s], s) for s in used}
    parts = {s: live_part(dicts.saes[s], masks[s]) for s in used}
    others = {}  # the control's dictionaries of the residual sites
    for r in residual if control else []:
        sae = control.saes[control.paths.index(dicts.paths[r])]
        others[r] = live_part(sae, live(sae, r))

    sites, born, partner, chance = [], [], [], None
    for n, r in enumerate(residual):
        size = parts[r].cfg.d_sae
        origin, born_here = np.full(size, "unattributed", dtype=object), np.full(size, n)
        record = {"path": dicts.paths[r], "latents": dicts.saes[r].cfg.d_sae, "live": size}
        if n:
            m = compare_saes(parts[residual[n - 1]], parts[r])
            chance = m["mmcs"]["chance_a_to_b"]
            pl, link = m["per_latent"], np.full(parts[residual[n - 1]].cfg.d_sae, -1)
            kept = pl["matched_cosine"] >= threshold
            link[pl["match_a"][kept]] = pl["match_b"][kept]
            born_here[pl["match_b"][kept]] = born[n - 1][pl["match_a"][kept]]
            origin[pl["match_b"][kept]] = "carried"
            partner.append(link)
            index = [masks[x].nonzero().squeeze(1).numpy() for x in (residual[n - 1], r)]
            record["matched_from_previous"] = {
                "mean_cosine": float(pl["matched_cosine"].mean()), "above_threshold": int(kept.sum()),
                # Every site's SAE starts latent j as the same token: a pair of one index may be that start alone.
                "same_index": float((index[0][pl["match_a"][kept]] == index[1][pl["match_b"][kept]]).mean())
                if kept.any() else 0.0}
            if control:
                record["across_seeds"] = {  # no shared start: previous site here vs this site in the control
                    "carried": matched(parts[residual[n - 1]], others[r], threshold),
                    "same_site": matched(parts[r], others[r], threshold)}
        new = origin != "carried"
        best = {}
        for kind, where in writes[r].items():
            if where:
                best[kind] = np.max([compare_saes(parts[w], parts[r])["per_latent"]["max_cosine_b"] for w in where], 0)
        if best:
            cos = np.stack([best.get(k, np.full(size, -1.0)) for k in ("attention", "mlp")])
            kind = np.where(cos.max(0) < threshold, "neither", np.where(cos[0] >= cos[1], "attention", "mlp"))
            origin[new] = kind[new]
            record["writes"] = {k: [dicts.paths[w] for w in where] for k, where in writes[r].items()}
            record["new_best_cosine_median"] = {k: float(np.median(v[new])) if new.any() else None
                                                for k, v in best.items()}
            # Below the threshold too: which write's dictionary holds the nearer direction.
            record["new_closer_to"] = {"attention": int((cos[0][new] >= cos[1][new]).sum()),
                                       "mlp": int((cos[0][new] < cos[1][new]).sum())}
        record["origin"] = {o: int((origin == o).sum()) for o in ORIGINS}
        sites.append(record)
        born.append(born_here)

    # The last residual site each feature's chain reaches, from the deepest site back.
    last = [None] * len(residual)
    last[-1] = np.full(parts[residual[-1]].cfg.d_sae, len(residual) - 1)
    for n in reversed(range(len(residual) - 1)):
        last[n] = np.where(partner[n] >= 0, last[n + 1][np.maximum(partner[n], 0)], n)
    persistence = {}
    for n, r in enumerate(residual):
        lifetime = last[n][born[n] == n] - n + 1  # residual sites a feature born here lasts, itself included
        persistence[dicts.paths[r]] = {"born": len(lifetime), "lifetime_counts":
                                       np.bincount(lifetime, minlength=len(residual) - n + 1)[1:].tolist()}
    first = np.bincount(born[-1], minlength=len(residual))
    report = {"folder": str(dicts.folder), "control": str(control.folder) if control else None,
              "threshold": threshold, "chance_cosine": chance,
              "tokens": tokens, "data": None if data is None or hasattr(data, "seq_len") else str(data),
              "sites": sites, "persistence": persistence,
              "last_site": {"path": dicts.paths[residual[-1]],
                            "first_site": {dicts.paths[r]: int(c) for r, c in zip(residual, first)},
                            "mean_chain_length": float((len(residual) - born[-1]).mean())}}
    if output is not None:
        write_results(output, overwrite, "evolution", report, summary(report), plot)
    return report


def summary(report: dict) -> str:
    t = report["threshold"]
    how = f"live latents (firing on {report['tokens']} tokens)" if report["tokens"] else "all latents"
    lines = [f"# Feature evolution across residual sites of `{report['folder']}`", "",
             f"{how}; matched site to site one-to-one by decoder cosine, carried at cosine >= {t} (random "
             f"directions: best cosine {report['chance_cosine']:.2f}); a new feature is credited to the attention or "
             f"MLP write whose dictionary holds a direction at cosine >= {t}. Every feature of the first residual "
             "site counts as new (there is nothing before it to match).", "",
             "| site | live | carried | new: attention | new: MLP | new: neither | new: no write dictionaries | "
             "new: median best cosine with attn / MLP | new: closer to attn / MLP |", "|---|---|---|---|---|---|---|---|---|"]
    for s in report["sites"]:
        o, med, closer = s["origin"], s.get("new_best_cosine_median", {}), s.get("new_closer_to")
        cos = " / ".join("-" if med.get(k) is None else f"{med[k]:.2f}" for k in ("attention", "mlp"))
        closer = f"{closer['attention']} / {closer['mlp']}" if closer else "-"
        lines.append(f"| `{s['path']}` | {s['live']} | {o['carried']} | {o['attention']} | {o['mlp']} | "
                     f"{o['neither']} | {o['unattributed']} | {cos if med else '-'} | {closer} |")
    lines += ["", "Carried features and the shared start: the trainer starts latent j of every site's SAE as the "
              "same token's activation, so a pair with one index may be carried by that start alone. A control "
              "(the same sites trained with another seed) has no shared start: the previous site's features matched "
              "to the control's at this site, against this site's matched to the control's at the same site (what "
              "two seeds both find at all).", "",
              "| site | carried | of them with one index | carried, to the control | same site, to the control | "
              "ratio |", "|---|---|---|---|---|---|"]
    for s in report["sites"][1:]:
        m, seeds = s["matched_from_previous"], s.get("across_seeds")
        cells = (f"{seeds['carried']} | {seeds['same_site']} | {seeds['carried'] / max(seeds['same_site'], 1):.2f}"
                 if seeds else "- | - | -")
        lines.append(f"| `{s['path']}` | {m['above_threshold']} | {m['same_index']:.1%} | {cells} |")
    lines += ["", "Persistence: of the features that appear at a site, how many last 1, 2, ... residual sites "
              "(the site itself counted; no chain can go past the last site).", ""]
    for path, p in report["persistence"].items():
        lines.append(f"- `{path}`: {p['born']} appear; lifetimes {p['lifetime_counts']}")
    last = report["last_site"]
    lines += ["", f"Features of the last site `{last['path']}` by the site where their chain starts: "
              + ", ".join(f"`{p}` {c}" for p, c in last["first_site"].items())
              + f"; mean chain length {last['mean_chain_length']:.2f} sites.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    names = [s["path"] for s in report["sites"]]
    bottom = np.zeros(len(names))
    labels = {"carried": "carried from the previous site", "attention": "new: attention writes it",
              "mlp": "new: MLP writes it", "neither": "new: neither", "unattributed": "new: no write dictionaries"}
    for origin, label in labels.items():
        counts = np.array([s["origin"][origin] for s in report["sites"]])
        left.bar(names, counts, bottom=bottom, label=label)
        bottom += counts
    left.set_ylabel("live features")
    left.set_ylim(0, bottom.max() * 1.45)  # room for the legend
    left.set_title(f"features per residual site (cosine >= {report['threshold']})", fontsize=10)
    left.tick_params(axis="x", labelrotation=20, labelsize=8)
    left.legend(fontsize=7)
    born = list(report["persistence"].items())[:-1]  # at the last site every feature lasts 1 site: nothing to see
    width = 0.8 / len(born)
    for n, (site, p) in enumerate(born):
        counts = np.array(p["lifetime_counts"], dtype=float)
        x = np.arange(1, len(counts) + 1) + (n - (len(born) - 1) / 2) * width
        right.bar(x, counts / max(counts.sum(), 1), width, label=f"appearing at {site} ({p['born']})")
    right.set_xlabel("residual sites the feature lasts")
    right.set_ylabel("fraction of the features appearing there")
    right.set_xticks(range(1, len(names) + 1))
    right.set_title("persistence", fontsize=10)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
