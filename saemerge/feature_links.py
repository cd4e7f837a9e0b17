"""`saemerge links`: causal links between the features of two sites of a dictionaries folder.

For the N most active features i of an upstream site U and the M most active features j of a later site D:
- ablation, the truth: effect[i, j] = mean over tokens of z_D[j] clean - z_D[j] with feature i ablated at every
  token (zeroed, or resampled: its activation at a random other token of the sample); one forward up to D per
  upstream feature, several features per forward as copies of the batch;
- attribution, the fast estimate: attr[i, j] = mean over tokens of dz_D[j]/dz_U[i] * (z_U[i] - its ablated
  value), gradient x activation (Marks et al., sparse feature circuits, 2024); one backward per downstream
  feature, the same way.
Their agreement over all N x M pairs (Spearman, Pearson, overlap of the strongest edges) says how far the linear
estimate can stand in for the ablation. Ablation costs N passes of the sample up to site D, attribution M forward
and backward passes (all upstream features come from the same backward, so its cost does not grow with N): on one
CPU core, 64 x 64 features took 1 to 1.5 minutes per method on 4096 tokens of the zoo GPT-2 and 2.5 to 3.5 on 2048
tokens of Gemma-3-270m (eval/feature_links_benchmark.py); hence the bounded defaults.
Position 0 (an attention sink, never edited) is left out of every statistic. Only sites U and D hold an SAE: the
SAE error is kept, so the sites in between run exactly as without one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .dictionaries import Dictionaries
from .errors import UserError
from .feature_intervention import code_gradient, run_features
from .feature_sample import Sample, load, site_index, snippet
from .files import refuse_existing, write_results

# Tokens per forward, copies of the batch included. Copies (several features per forward) halve the time on the
# tiny test models, where a forward's fixed cost dominates; on the zoo GPT-2 the cost is per token whichever way
# up to 4096 tokens, and 16384 is 1.5x slower.
BATCH_TOKENS = 2048
SNIPPETS = 3  # top examples per drawn feature


def feature_links(folder: str | Path, upstream: int | str, downstream: int | str, output: str | Path | None = None,
                  data: str | Path | None = None, tokens: int = 4096, upstream_features: int | list[int] = 64,
                  downstream_features: int | list[int] = 64, ablation: str = "zero", top_edges: int = 30,
                  source: str | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Ablation effects and attributions from the features of site `upstream` to those of site `downstream` (site
    indices in the folder's order or module paths; upstream first) on `tokens` tokens of the recipe's data drawn
    with the seed after the training one, as the other feature analyses (or of `data`, a JSON lines file with
    "text"). Features: the N (or M) with the largest total activation that fire on the sample, or a list of
    latents. With `output`, writes links.json, links.md and links.png (the `top_edges` strongest edges) into
    that new folder. Returns the report (links.json's content)."""
    from .browser import _data_spec
    from .sources import load_source, load_tokenizer

    start = time.perf_counter()
    dicts = load(folder, "DICT_DIR", source)
    u, d = site_index(dicts, upstream, "--upstream"), site_index(dicts, downstream, "--downstream")
    if u >= d:
        raise UserError(f"--downstream: site {d} ({dicts.paths[d]}) is not after --upstream site {u} "
                        f"({dicts.paths[u]}); expected a later site")
    if ablation not in ("zero", "resample"):
        raise UserError(f"--ablation: '{ablation}'; expected zero or resample")
    for arg, value in (("--tokens", tokens), ("--top-edges", top_edges)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{arg}: {value}; expected a positive whole number")
    _check_features(upstream_features, dicts.saes[u].cfg.d_sae, "upstream_features")
    _check_features(downstream_features, dicts.saes[d].cfg.d_sae, "downstream_features")
    output = Path(output) if output is not None else None
    refuse_existing(output, overwrite)
    for sae in dicts.saes:
        sae.requires_grad_(False)  # gradients go to the sites' outputs only

    model = load_source(dicts.spec)
    tokenizer = load_tokenizer(dicts.spec)
    seed = dicts.recipe.train.seed + 1
    ids = _sample(_data_spec(dicts.recipe, data), tokenizer, tokens, seed)

    timer = time.perf_counter()
    total_u, total_d = _totals(model, dicts, u, d, ids)
    up = _choose(total_u, upstream_features, "--upstream")
    down = _choose(total_d, downstream_features, "--downstream")
    z_u, z_d = _codes(model, dicts, u, d, up, down, ids)
    ablated = torch.zeros_like(z_u) if ablation == "zero" else _resampled(z_u, torch.Generator().manual_seed(seed))
    clean_seconds = time.perf_counter() - timer

    timer = time.perf_counter()
    effect = ablation_effects(model, dicts, u, d, up, down, ids, ablated, z_d, progress)
    ablation_seconds = time.perf_counter() - timer
    timer = time.perf_counter()
    attribution = attributions(model, dicts, u, d, up, down, ids, z_u - ablated, progress)
    attribution_seconds = time.perf_counter() - timer

    n_tokens = ids.shape[0] * (ids.shape[1] - 1)
    report = {
        "folder": str(folder), "source": dicts.source, "data": str(data) if data else None,
        "upstream": {"site": u, "path": dicts.paths[u]}, "downstream": {"site": d, "path": dicts.paths[d]},
        "settings": {"tokens": n_tokens, "sequences": ids.shape[0], "seq_len": ids.shape[1], "ablation": ablation,
                     "seed": seed, "top_edges": top_edges},
        "agreement": agreement(effect, attribution, top_edges),
        "seconds": {"clean": round(clean_seconds, 2), "ablation": round(ablation_seconds, 2),
                    "attribution": round(attribution_seconds, 2),
                    "total": round(time.perf_counter() - start, 2)},
        "upstream_features": _feature_rows(up, total_u, z_u, n_tokens),
        "downstream_features": _feature_rows(down, total_d, z_d, n_tokens),
        "edges": _edges(up, down, effect, attribution),
    }
    drawn, sample = report["edges"][:top_edges], Sample(ids, {}, tokenizer)
    report["snippets"] = {  # keyed by the latent as text, as JSON has it
        "upstream": {str(i): _snippets(z_u[..., up.index(i)], sample) for i in sorted({e["upstream"] for e in drawn})},
        "downstream": {str(j): _snippets(z_d[..., down.index(j)], sample)
                       for j in sorted({e["downstream"] for e in drawn})}}
    if output is not None:
        write_results(output, overwrite, "links", report, summary(report), plot_links)
    return report


# --- inputs -------------------------------------------------------------------------------------------------
def _check_features(features: int | list[int], d_sae: int, arg: str) -> None:
    if isinstance(features, int):
        if not 1 <= features <= d_sae:
            raise UserError(f"--features: {features}; expected a whole number from 1 to {d_sae} (the SAE's width)")
    elif not features or any(not 0 <= f < d_sae for f in features) or len(set(features)) < len(features):
        raise UserError(f"{arg}: {features}; expected distinct latents from 0 to {d_sae - 1}")


def _sample(spec, tokenizer, tokens: int, seed: int) -> torch.Tensor:
    """[sequences, seq_len] ids: enough whole sequences for `tokens` tokens after position 0."""
    from .data import token_batches

    n = math.ceil(tokens / (spec.seq_len - 1))
    batches = token_batches(spec, tokenizer, min(n, max(1, BATCH_TOKENS // spec.seq_len)), seed)
    rows = []
    while sum(len(r) for r in rows) < n:
        rows.append(next(batches))
    return torch.cat(rows)[:n]


def _batches(ids: torch.Tensor, copies: int = 1):
    """(start, rows) of the sample, at most BATCH_TOKENS tokens once the rows are repeated `copies` times."""
    step = max(1, BATCH_TOKENS // (copies * ids.shape[1]))
    for start in range(0, len(ids), step):
        yield start, ids[start:start + step]


def _chunked(ids: torch.Tensor, n_features: int, desc: str, progress: bool):
    """(slice of the sample, its rows, a chunk of feature positions) for every block of sequences and every chunk:
    a chunk's features share one forward, as copies of the rows (as many as fit BATCH_TOKENS, one row each)."""
    copies = max(1, min(n_features, BATCH_TOKENS // ids.shape[1]))
    chunks = [list(range(i, min(i + copies, n_features))) for i in range(0, n_features, copies)]
    with tqdm(total=len(chunks) * len(ids), desc=desc, unit="seq", disable=not progress) as bar:
        for start, rows in _batches(ids, copies):
            for chunk in chunks:
                yield slice(start, start + len(rows)), rows, chunk
                bar.update(len(rows))


# --- the measurements ---------------------------------------------------------------------------------------
@torch.no_grad()
def _totals(model, dicts: Dictionaries, u: int, d: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each latent's total activation at sites u and d over the sample ([d_sae] each)."""
    totals = [0.0, 0.0]
    for _, rows in _batches(ids):
        codes = run_features(model, dicts, rows, until=d, sites=[u, d]).codes
        totals = [t + codes[s][:, 1:].float().sum((0, 1)) for t, s in zip(totals, (u, d))]
    return totals[0], totals[1]


def _choose(total: torch.Tensor, features: int | list[int], arg: str) -> list[int]:
    """The given latents, or the `features` most active ones among those that fire."""
    if not isinstance(features, int):
        return list(features)
    chosen = [f for f in total.topk(features).indices.tolist() if total[f] > 0]
    if not chosen:
        raise UserError(f"--tokens: no latent of the {arg[2:]} site fires on the sample; expected more tokens")
    return chosen


@torch.no_grad()
def _codes(model, dicts: Dictionaries, u: int, d: int, up: list[int], down: list[int], ids: torch.Tensor):
    """The chosen latents' clean codes over the sample: [sequences, seq_len, N] at u, [..., M] at d."""
    z_u, z_d = [], []
    for _, rows in _batches(ids):
        codes = run_features(model, dicts, rows, until=d, sites=[u, d]).codes
        z_u.append(codes[u][..., up].float())
        z_d.append(codes[d][..., down].float())
    return torch.cat(z_u), torch.cat(z_d)


def _resampled(z: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each token's codes taken from another token of the sample (one cyclic shuffle of all tokens after
    position 0, the same for every feature, so no token keeps its own)."""
    flat = z[:, 1:].reshape(-1, z.shape[-1])
    order = torch.randperm(len(flat), generator=generator)
    source = torch.empty_like(order)
    source[order] = order.roll(1)
    out = z.clone()
    out[:, 1:] = flat[source].reshape(z[:, 1:].shape)
    return out


def _set_latents(latents: torch.Tensor, values: torch.Tensor):
    """An edit for copies of a batch: in copy c, latent latents[c] takes values[c] ([copies, rows, seq_len])."""
    def edit(site: int, z: torch.Tensor) -> torch.Tensor:
        z = z.clone().view(len(latents), -1, *z.shape[1:])
        z[torch.arange(len(latents)), :, :, latents] = values.to(z.dtype)
        return z.flatten(0, 1)
    return edit


@torch.no_grad()
def ablation_effects(model, dicts: Dictionaries, u: int, d: int, up: list[int], down: list[int], ids: torch.Tensor,
                     ablated: torch.Tensor, z_d: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """effect [N, M]: mean over tokens of z_D clean - z_D with upstream feature i set to `ablated`[..., i]."""
    effect = torch.zeros(len(up), len(down))
    for batch, rows, chunk in _chunked(ids, len(up), "links: ablation", progress):
        edit = _set_latents(torch.tensor([up[i] for i in chunk]), ablated[batch][..., chunk].permute(2, 0, 1))
        codes = run_features(model, dicts, rows.repeat(len(chunk), 1), edit=edit, until=d, sites=[u, d]).codes
        edited = codes[d][..., down].float().view(len(chunk), len(rows), *z_d.shape[1:])
        effect[chunk] += (z_d[batch][:, 1:] - edited[:, :, 1:]).sum((1, 2))
    return effect / (ids.shape[0] * (ids.shape[1] - 1))


def attributions(model, dicts: Dictionaries, u: int, d: int, up: list[int], down: list[int], ids: torch.Tensor,
                 removed: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """attr [N, M]: mean over tokens of dz_D[j]/dz_U[i] * `removed`[..., i] (what the ablation takes away),
    where dz_D[j] is the sum of downstream feature j over the sequence's tokens after position 0."""
    attr = torch.zeros(len(up), len(down))
    for batch, rows, chunk in _chunked(ids, len(down), "links: attribution", progress):
        # copy c of the rows backpropagates downstream feature chunk[c]
        run = run_features(model, dicts, rows.repeat(len(chunk), 1), until=d, grad=True, sites=[u, d])
        z = run.codes[d].view(len(chunk), len(rows), *run.codes[d].shape[1:])
        z[torch.arange(len(chunk)), :, 1:, torch.tensor([down[j] for j in chunk])].sum().backward()
        grad = code_gradient(dicts, u, run.deltas[u].grad)[..., up]  # [copies * rows, seq_len, N]
        grad = grad.view(len(chunk), len(rows), *grad.shape[1:])
        attr[:, chunk] += torch.einsum("crtn,rtn->nc", grad[:, :, 1:], removed[batch][:, 1:])
    return attr / (ids.shape[0] * (ids.shape[1] - 1))


def agreement(effect: torch.Tensor, attribution: torch.Tensor, k: int) -> dict:
    """How well attribution predicts ablation over all pairs: rank and linear correlation, the share of the k
    strongest ablation edges (by |effect|) among the k strongest by |attribution|, and sign agreement on them."""
    from scipy.stats import pearsonr, spearmanr

    a, b = effect.flatten().numpy(), attribution.flatten().numpy()
    k = min(k, len(a))
    top_a = torch.from_numpy(abs(a)).topk(k).indices
    top_b = torch.from_numpy(abs(b)).topk(k).indices
    constant = a.std() == 0 or b.std() == 0
    return {"pairs": len(a), "spearman": None if constant else round(float(spearmanr(a, b).statistic), 4),
            "pearson": None if constant else round(float(pearsonr(a, b).statistic), 4),
            "top_k": k, "top_k_overlap": round(len(set(top_a.tolist()) & set(top_b.tolist())) / k, 4),
            "top_k_same_sign": round(float((a[top_a] * b[top_a] > 0).mean()), 4)}


# --- the report ---------------------------------------------------------------------------------------------
def _feature_rows(features: list[int], total: torch.Tensor, z: torch.Tensor, n_tokens: int) -> list[dict]:
    fires = (z[:, 1:] > 0).float().sum((0, 1)) / n_tokens
    return [{"feature": f, "total_activation": round(float(total[f]), 3), "firing_rate": round(float(r), 5)}
            for f, r in zip(features, fires)]


def _edges(up: list[int], down: list[int], effect: torch.Tensor, attribution: torch.Tensor) -> list[dict]:
    order = effect.abs().flatten().argsort(descending=True).tolist()
    return [{"upstream": up[n // len(down)], "downstream": down[n % len(down)],
             "effect": round(float(effect.flatten()[n]), 6), "attribution": round(float(attribution.flatten()[n]), 6)}
            for n in order]


def _snippets(z: torch.Tensor, sample: Sample) -> list[dict]:
    """The feature's top activations [sequences, seq_len] in context, the token itself in [[ ]]."""
    values, rows = z[:, 1:].flatten().topk(min(SNIPPETS, z[:, 1:].numel()))
    return [{"activation": round(v, 3), "text": snippet(sample, r)}
            for v, r in zip(values.tolist(), rows.tolist()) if v > 0]


def _label(report: dict, end: str, feature: int) -> str:
    """A feature's name with its top token, e.g. '123 [[def]]'."""
    snippets = report["snippets"][end].get(str(feature))
    if not snippets:
        return str(feature)
    token = snippets[0]["text"].split("[[", 1)[1].rsplit("]]", 1)[0].strip()
    return f"{feature} [[{token[:12]}]]"


def summary(report: dict, edges: int = 15) -> str:
    """links.md: settings, agreement, timings and the strongest edges."""
    a, s, t = report["agreement"], report["settings"], report["seconds"]
    number = lambda x: "-" if x is None else f"{x:.3f}"
    lines = [f"# Feature links: {report['upstream']['path']} -> {report['downstream']['path']}", "",
             f"- {report['folder']} (source {report['source']}), {s['tokens']} tokens "
             f"({s['sequences']} x {s['seq_len']}, position 0 left out) of "
             f"{report['data'] or 'the recipe data'}; {len(report['upstream_features'])} upstream x "
             f"{len(report['downstream_features'])} downstream features (most active); {s['ablation']} ablation",
             "- effect = mean over tokens of z_down clean - z_down with the upstream feature ablated; attribution = "
             "gradient x (activation - ablated value)",
             f"- agreement over {a['pairs']} pairs: Spearman {number(a['spearman'])}, Pearson {number(a['pearson'])}; "
             f"top {a['top_k']} edges: {a['top_k_overlap']:.0%} shared, {a['top_k_same_sign']:.0%} same sign",
             f"- seconds: ablation {t['ablation']:.1f}, attribution {t['attribution']:.1f}, clean passes "
             f"{t['clean']:.1f}, total {t['total']:.1f}", "",
             "| upstream | downstream | effect | attribution |", "|---|---|---|---|"]
    for e in report["edges"][:edges]:
        lines.append(f"| {_label(report, 'upstream', e['upstream'])} | "
                     f"{_label(report, 'downstream', e['downstream'])} | {e['effect']:+.4f} | "
                     f"{e['attribution']:+.4f} |")
    lines += ["", "Top-activating snippets of the features of the five strongest edges:", ""]
    for end in ("upstream", "downstream"):
        for f in dict.fromkeys(e[end] for e in report["edges"][:5]):
            shown = report["snippets"][end].get(str(f)) or []
            quoted = [(x["text"].replace("`", "'"), x["activation"]) for x in shown[:2]]
            lines.append(f"- {end} {f}: " + " · ".join(f"`{text}` ({value:.2f})" for text, value in quoted))
    return "\n".join(lines) + "\n"


def plot_links(report: dict, path: str | Path) -> None:
    """The strongest edges: upstream features in the left column, downstream in the right, line width by
    |effect|, red where ablating the upstream feature lowers the downstream one (a positive effect), blue where
    it raises it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def column(end: str) -> dict[int, float]:  # feature -> height, evenly spaced from the top
        features = sorted({e[end] for e in edges})
        return {f: 1 - i / max(1, len(features) - 1) for i, f in enumerate(features)}

    edges = report["edges"][:report["settings"]["top_edges"]]
    y_up, y_down = column("upstream"), column("downstream")
    strongest = max(abs(e["effect"]) for e in edges) or 1.0
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.3 * max(len(y_up), len(y_down)) + 1)))
    for e in reversed(edges):  # strongest drawn last, on top
        ax.plot([0, 1], [y_up[e["upstream"]], y_down[e["downstream"]]], color="tab:red" if e["effect"] > 0
                else "tab:blue", linewidth=0.5 + 5 * abs(e["effect"]) / strongest, alpha=0.7, solid_capstyle="round")
    for x, ys, end, align in ((0, y_up, "upstream", "right"), (1, y_down, "downstream", "left")):
        ax.scatter([x] * len(ys), list(ys.values()), color="black", s=12, zorder=3)
        for f, y in ys.items():
            ax.text(x + (-0.03 if x == 0 else 0.03), y, _label(report, end, f), ha=align, va="center", fontsize=7)
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylim(-0.08, 1.08)
    ax.axis("off")
    a = report["agreement"]
    ax.set_title(f"{report['upstream']['path']} -> {report['downstream']['path']}: top {len(edges)} edges by "
                 f"|{report['settings']['ablation']}-ablation effect| (red: positive, blue: negative)\nattribution vs "
                 f"ablation: Spearman {a['spearman']}, top-{a['top_k']} overlap {a['top_k_overlap']:.0%}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
