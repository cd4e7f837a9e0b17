"""`saemerge report`: a static, offline HTML feature browser of a merged folder (or of an analysis folder).

The sources read the same tokens (a merge's sources share one tokenizer); each source runs up to its sites, its
SAE encodes the activations, and per latent only bounded statistics are kept: how often it fires in each source,
how often in both on the same token (co-firing), and its `top` highest activations per source (a running top-k,
merged batch by batch; never a [tokens, d_sae] matrix over all tokens). A second pass re-encodes only the
sequences that hold a chosen latent's top examples, to shade every token of a snippet by its activation.
The pages themselves are written by browser_pages.py.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import UserError
from .files import new_folder

CHUNK = 2 ** 24  # codes encoded at once (tokens x d_sae, 64 MB of float32)
BATCH_TOKENS = 2048
MERGED = "a merged model folder (recipe.yaml and saes/<source>/<module path>/, written by `saemerge merge`)"
ANALYSIS = "an analysis folder (analysis.json, written by `saemerge analyze --output`)"


@dataclass
class SiteStats:
    """Bounded per-latent statistics of one site, each source's SAE over the same tokens."""
    count: dict[str, torch.Tensor]  # tokens where the latent fires, per source [d_sae]
    both: dict[tuple[str, str], torch.Tensor]  # tokens where it fires in both sources of a pair [d_sae]
    top_val: dict[str, torch.Tensor]  # the `top` highest activations [top, d_sae]; -1: no example
    top_pos: dict[str, torch.Tensor]  # where: sequence * seq_len + position [top, d_sae]
    tokens: int = 0  # positions encoded per source
    snippets: dict = field(default_factory=dict)  # (source, sequence) -> activations [seq_len, chosen] (pass 2)


def _encode(sae, x: torch.Tensor, rows: int):
    """Dense codes of `x`, `rows` rows at a time (yields row offset, codes)."""
    for start in range(0, len(x), rows):
        yield start, sae.encode(x[start:start + rows]).float()


@torch.no_grad()
def harvest(sources: dict, paths: dict[str, list[str]], saes: list[dict], batches, n_sequences: int, top: int = 8,
            shared: bool = True, progress: bool = True) -> tuple[dict[str, torch.Tensor], list[SiteStats]]:
    """Run every source on `n_sequences` sequences of `batches` (an iterator of [batch, seq_len] ids, or with
    `shared=False` a dict {source: iterator}: then no co-firing) and encode each site with its SAEs.
    Returns ({source: ids [n_sequences, seq_len]}, one SiteStats per site). Position 0 is left out, as in training
    (its residual is an attention-sink outlier)."""
    from .hooks import run_to_layers

    names = list(sources)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]] if shared else []
    stats = []
    for site in saes:
        d_sae = {n: site[n].cfg.d_sae for n in names}
        stats.append(SiteStats(
            count={n: torch.zeros(d_sae[n], dtype=torch.long) for n in names},
            both={p: torch.zeros(d_sae[p[0]], dtype=torch.long) for p in pairs},
            top_val={n: torch.full((top, d_sae[n]), -1.0) for n in names},
            top_pos={n: torch.full((top, d_sae[n]), -1, dtype=torch.long) for n in names}))
    ids, done = {n: [] for n in names}, 0
    bar = tqdm(total=n_sequences, desc="browser: activations", unit="seq", disable=not progress)
    while done < n_sequences:
        if shared:
            shared_ids = next(batches)[:n_sequences - done]
            batch = {n: shared_ids for n in names}
        else:
            batch = {n: next(batches[n])[:n_sequences - done] for n in names}
        hidden = {n: run_to_layers(sources[n], paths[n], batch[n].to(sources[n].device)) for n in names}
        seq_len = batch[names[0]].shape[1]
        where = ((done + torch.arange(len(batch[names[0]])))[:, None] * seq_len + torch.arange(1, seq_len)).flatten()
        for s, st in enumerate(stats):
            x = {n: hidden[n][s][:, 1:].reshape(-1, hidden[n][s].shape[-1]) for n in names}
            # Sources encode the same rows chunk by chunk, so co-firing compares codes of the same token.
            rows = max(1, CHUNK // max(saes[s][n].cfg.d_sae for n in names))
            chunks = zip(*(_encode(saes[s][n], x[n], rows) for n in names))
            for chunk in chunks:
                start, fire = chunk[0][0], {}
                for n, (_, z) in zip(names, chunk):
                    fire[n] = z > 0
                    st.count[n] += fire[n].sum(0)
                    val, row = z.topk(min(top, len(z)), dim=0)
                    val, keep = torch.cat([st.top_val[n], val]).topk(top, dim=0)
                    pos = torch.cat([st.top_pos[n], where[start + row]])
                    st.top_val[n], st.top_pos[n] = val, pos.gather(0, keep)
                for a, b in pairs:
                    st.both[a, b] += (fire[a] & fire[b]).sum(0)
            st.tokens += len(where)
        for n in names:
            ids[n].append(batch[n].cpu())
        done += len(batch[names[0]])
        bar.update(len(batch[names[0]]))
    bar.close()
    return {n: torch.cat(ids[n]) for n in names}, stats


def choose_latents(st: SiteStats, n: int) -> list[tuple[int, str]]:
    """About 3/4 of `n`: the latents that fire in every source, most frequent first (by their rarest source);
    the rest: per source, the most frequent latents that fire in that source alone; too few of either, the most
    frequent others fill up. Returns (latent, where it fires)."""
    names = list(st.count)
    fires = torch.stack([st.count[s] for s in names])  # [sources, d_sae] (aligned SAEs: one latent space)
    everywhere, alone = (fires > 0).all(0), (fires > 0).sum(0) == 1

    def kind(j: int) -> str:
        if len(names) == 1:
            return "fires"
        if everywhere[j]:
            return "all sources"
        return f"{names[int(fires[:, j].argmax())]} only" if alone[j] else "some sources"

    def most_frequent(score: torch.Tensor, keep: torch.Tensor) -> list[int]:
        return torch.argsort(torch.where(keep, score, -1), descending=True)[:int(keep.sum())].tolist()

    per_source = (n // 4) // len(names) if len(names) > 1 else 0
    one_sided = [j for i in range(len(names)) for j in most_frequent(fires[i], alone & (fires[i] > 0))[:per_source]]
    chosen = most_frequent(fires.min(0).values, everywhere)[:n - len(one_sided)] + one_sided
    taken = set(chosen)
    chosen += [j for j in most_frequent(fires.sum(0), fires.sum(0) > 0) if j not in taken][:n - len(chosen)]
    return [(j, kind(j)) for j in chosen]


@torch.no_grad()
def snippet_codes(sources: dict, paths: dict[str, list[str]], saes: list[dict], ids: dict[str, torch.Tensor],
                  stats: list[SiteStats], chosen: list[list[int]], progress: bool = True) -> None:
    """Second pass: the chosen latents' activations on every token of the sequences that hold their top
    examples, into stats[site].snippets[(source, sequence)] ([seq_len, len(chosen[site])], position 0 zero)."""
    from .hooks import run_to_layers

    for name, model in sources.items():
        seq_len = ids[name].shape[1]
        needed = sorted({int(p) // seq_len for st, cols in zip(stats, chosen)
                         for p in st.top_pos[name][:, cols].flatten() if p >= 0})
        step = max(1, BATCH_TOKENS // seq_len)
        for start in tqdm(range(0, len(needed), step), desc=f"browser: snippets of {name}", disable=not progress):
            rows = needed[start:start + step]
            hidden = run_to_layers(model, paths[name], ids[name][rows].to(model.device))
            for s, (st, cols) in enumerate(zip(stats, chosen)):
                x = hidden[s][:, 1:].reshape(-1, hidden[s].shape[-1])
                chunk = max(1, CHUNK // saes[s][name].cfg.d_sae)
                z = torch.cat([codes[:, cols] for _, codes in _encode(saes[s][name], x, chunk)]).cpu()
                z = torch.cat([z.new_zeros(len(rows), 1, len(cols)), z.reshape(len(rows), seq_len - 1, -1)], 1)
                for r, seq in enumerate(rows):
                    st.snippets[name, seq] = z[r]


def promoted_tokens(model, sae, latents: list[int], k: int = 10) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The tokens each latent's decoder row (in activation units: times act_scale) raises most through the
    source's unembedding alone, W_U @ d (a direct-logit reading: no final norm, no later layers): (values,
    token ids), each [len(latents), k]; None when the site's width is not the head's."""
    head = model.get_output_embeddings()
    if head is None or head.weight.shape[1] != sae.cfg.d_in:
        return None
    rows = sae.W_dec[latents].detach().float().cpu() * float(sae.act_scale)
    logits = rows @ head.weight.detach().float().cpu().T
    return logits.topk(min(k, logits.shape[1]), dim=1)


# --- inputs -------------------------------------------------------------------------------------------------
def _analysis_folder(folder: Path, analysis: str | Path | None) -> Path | None:
    if analysis is not None:
        analysis = Path(analysis)
        if not (analysis / "analysis.json").is_file():
            raise UserError(f"--analysis: '{analysis}' has no analysis.json; expected {ANALYSIS}")
        return analysis
    found = sorted(p.parent for p in folder.glob("*/analysis.json"))
    return found[0] if found else None


def _read_analysis(folder: Path | None) -> dict | None:
    if folder is None:
        return None
    try:
        report = json.loads((folder / "analysis.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--analysis: '{folder / 'analysis.json'}' cannot be read: {e}") from None
    if not isinstance(report, dict):
        raise UserError(f"--analysis: '{folder / 'analysis.json'}' is not a JSON object; expected {ANALYSIS}")
    report["folder"] = folder
    return report


def _data_spec(recipe, data: str | Path | None):
    if data is None:
        return recipe.data
    from .recipe import DatasetSpec

    if not Path(data).is_file():
        raise UserError(f"--data: '{data}' is not a file; expected a JSON lines file with a \"text\" field")
    return recipe.data.model_copy(update={"datasets": [DatasetSpec(path="json", data_files=str(data))]})


def _merged(folder: Path, data, n_tokens: int, n_latents: int, top: int, progress: bool,
            allow_pickle: bool) -> dict:
    """Everything the pages of a merged folder show, measured."""
    from .analyze import _merged_sites
    from .retokenize import same_tokenizer
    from .data import token_batches
    from .pipeline import load_sources
    from .recipe import SAERecipe, load_recipe
    from .sae import SparseAutoencoder
    from .sources import load_tokenizer

    recipe = load_recipe(folder / "recipe.yaml", schema=SAERecipe)  # a merge or a train-saes folder
    spec = _data_spec(recipe, data)
    site_folders = _merged_sites(folder)
    names = [m.name for m in recipe.models if all(m.name in site for site in site_folders)]
    if not names:
        raise UserError(f"DIR: '{folder}': no source of recipe.yaml has an SAE at every site; expected {MERGED}")
    saes = [{n: SparseAutoencoder.load(site[n]).eval() for n in names} for site in site_folders]
    paths = {n: [site[n].name for site in site_folders] for n in names}
    start = time.perf_counter()
    sources = {n: model for n, model in load_sources(recipe, allow_pickle).items() if n in names}
    tokenizers = {m.name: load_tokenizer(m) for m in recipe.models if m.name in names}
    shared = all(same_tokenizer(tokenizers[names[0]], tokenizers[n]) for n in names)
    batch = max(1, BATCH_TOKENS // spec.seq_len)
    n_sequences = max(1, math.ceil(n_tokens / spec.seq_len))
    if shared:
        batches = token_batches(spec, tokenizers[names[0]], batch, recipe.train.seed)
    else:
        batches = {n: token_batches(spec, tokenizers[n], batch, recipe.train.seed) for n in names}
    ids, stats = harvest(sources, paths, saes, batches, n_sequences, top, shared, progress)
    chosen = [choose_latents(st, n_latents) for st in stats]
    snippet_codes(sources, paths, saes, ids, stats, [[j for j, _ in c] for c in chosen], progress)
    promoted = [{n: promoted_tokens(sources[n], site[n], [j for j, _ in c]) for n in names}
                for site, c in zip(saes, chosen)]
    return {"recipe": recipe, "names": names, "saes": saes, "paths": paths, "stats": stats, "chosen": chosen,
            "promoted": promoted, "ids": ids, "tokenizers": tokenizers, "shared": shared,
            "data": str(data) if data else None, "seconds": round(time.perf_counter() - start, 1)}


# --- the site -----------------------------------------------------------------------------------------------
def build_report(folder: str | Path, output: str | Path | None = None, analysis: str | Path | None = None,
                 tokens: int = 32768, latents: int = 200, data: str | Path | None = None, top: int = 8,
                 overwrite: bool = False, progress: bool = True, allow_pickle: bool = False) -> Path:
    """Write the feature browser of `folder` (a merged folder, or an analysis folder alone: its plots and numbers
    only) to `output` (default folder/browser): index.html and, for a merged folder, latents/<i>.html for the
    `latents` latents chosen per site (see choose_latents), measured on `tokens` tokens of the recipe's data (or
    of `data`, a JSON lines file with "text"). Analysis plots come from `analysis`, else from an analysis folder
    inside `folder`. Written to a hidden folder beside `output`, then renamed into place. Returns `output`."""
    from .browser_pages import write_site

    folder = Path(folder)
    is_merged = (folder / "recipe.yaml").is_file() and any(folder.glob("saes/*/*/cfg.json"))
    if not is_merged and not (folder / "analysis.json").is_file():
        raise UserError(f"DIR: '{folder}' is neither {MERGED} nor {ANALYSIS}")
    output = Path(output) if output is not None else folder / "browser"
    if output.exists() and not overwrite:
        raise UserError(f"--output: '{output}' exists; expected a new folder (or pass --overwrite)")
    for arg, value in (("--tokens", tokens), ("--latents", latents), ("--top", top)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{arg}: {value}; expected a positive whole number")
    report = _read_analysis(_analysis_folder(folder, analysis) if is_merged else folder)
    measured = _merged(folder, data, tokens, latents, top, progress, allow_pickle) if is_merged else None

    with new_folder(output, overwrite) as tmp:
        write_site(tmp, folder, measured, report)
    return output
