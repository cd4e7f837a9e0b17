"""`saemerge analyze`: compare two SAE dictionaries by their decoder directions (weights only, no activations;
with models and data, also by their activations: activation_measures.py).

Each measure is one line of the summary and one plot:
- MMCS (mean max cosine similarity), both ways: each decoder direction of A, its best cosine with any of B's,
  averaged. 1 means every direction of A has a twin in B (B may hold more).
- One-to-one matching (Hungarian): each latent of A paired with at most one of B so that the summed cosine is
  largest; the histogram of matched cosines and the fraction above 0.5 / 0.7 / 0.9. MMCS may count one direction
  of B as the twin of many of A; the matching cannot.
- Aligned SAEs only (the sources of one merged folder, or `aligned=True`): latent i of A vs latent i of B, by
  decoder cosine and by relative decoder norm r = |d_A| / (|d_A| + |d_B|), read as for crosscoders: near 1 the
  latent is A's alone, near 0 B's alone, near 0.5 shared.

Decoder cosines compare directions in the coordinates of the two residual streams: they mean something between
SAEs of one model, or of models sharing a basis (a base model and its fine-tune), and need the same d_in. For
aligned SAEs of different widths they are skipped; otherwise refused.

Scale: cosines are computed a block of rows at a time, never the whole n_a x n_b matrix. The exact Hungarian
(scipy's linear_sum_assignment) needs the dense matrix and O(n^3) time, so it runs up to `max_match` latents
(4096: about 2 s). Above, the matching is the best one-to-one matching over candidate pairs only: each latent's
`candidates` nearest partners, both ways, plus latent i with latent i so that a complete matching exists, solved
exactly on that sparse graph (scipy's min_weight_full_bipartite_matching). It still covers every latent, unlike
matching random subsets (with 4096 of 16384 latents sampled on each side, 3/4 of an identical dictionary's twins
would be missing from the other sample). Its summed cosine can only be lower than the exact matching's; on test
dictionaries (noisy copies, random ones) its numbers agree with the exact ones to 3 decimals.

Relative decoder norms are in each SAE's own units: ours of activations divided by act_scale (which evens out the
models' scales, as crosscoders normalise their inputs), SAELens' and sparsify's of raw activations (an exported
copy of ours has act_scale folded into its rows). saemerge's trainer keeps every decoder row at unit norm, so
for its SAEs r is 0.5 for every latent and the summary says that the measure cannot tell anything there.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from .errors import UserError
from .files import new_folder, refuse_existing
from .interchange import import_sae
from .activation_measures import (DATA_FILE, TOKENS, check_tokenizers, compare_activations, data_spec, sample_texts,
                                  summary_lines)
from .sae import SparseAutoencoder

THRESHOLDS = (0.5, 0.7, 0.9)
MAX_MATCH = 4096
CANDIDATES = 8
BLOCK = 2 ** 26  # cosines held at once (256 MB of float32)
SAE_FOLDER = "an SAE folder (cfg.json with sae.safetensors or sae_weights.safetensors)"


# --- measures -----------------------------------------------------------------------------------------------
def _unit_rows(sae: SparseAutoencoder) -> torch.Tensor:
    return F.normalize(sae.W_dec.detach().float().cpu(), dim=-1)  # a zero row stays zero: cosine 0 with all


@torch.no_grad()
def _scan(a: torch.Tensor, b: torch.Tensor, k: int):
    """Each row's k best cosines with the other side, both ways, a block of rows of `a` at a time:
    (values [n_a, k], indices into b), (values [k, n_b], indices into a); sorted, best first."""
    n_a, n_b = len(a), len(b)
    k_a, k_b = min(k, n_b), min(k, n_a)
    row_val, row_idx = torch.empty(n_a, k_a), torch.empty(n_a, k_a, dtype=torch.long)
    col_val, col_idx = torch.full((k_b, n_b), -2.0), torch.zeros(k_b, n_b, dtype=torch.long)
    step = max(1, BLOCK // max(n_b, 1))
    for start in range(0, n_a, step):
        cos = a[start:start + step] @ b.T
        row_val[start:start + step], row_idx[start:start + step] = cos.topk(k_a, dim=1)
        col_val, i = torch.cat([col_val, cos]).topk(k_b, dim=0)  # the best so far, or rows of this block
        col_idx = torch.where(i < k_b, col_idx.gather(0, i.clamp(max=k_b - 1)), i - k_b + start)
    return (row_val, row_idx), (col_val, col_idx)


def _chance_mmcs(d_in: int, n: int, samples: int = 256) -> float:
    """The MMCS of random directions against `n` random directions in `d_in` dimensions: what no relation at all
    gives (trained dictionaries are not isotropic, so read it as a floor, not a null)."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(samples, d_in, generator=g), dim=-1)
    best = torch.full((samples,), -1.0)
    for start in range(0, n, 4096):
        y = F.normalize(torch.randn(min(4096, n - start), d_in, generator=g), dim=-1)
        best = torch.maximum(best, (x @ y.T).max(1).values)
    return float(best.mean())


def _match(a: torch.Tensor, b: torch.Tensor, rows, cols, max_match: int) -> tuple[np.ndarray, np.ndarray, str]:
    """One-to-one matching maximising the summed cosine: exact up to `max_match` latents, else over the
    candidate pairs of `_scan` (see the module docstring). Returns (A indices, B indices, method)."""
    n_a, n_b = len(a), len(b)
    if max(n_a, n_b) <= max_match:
        r, c = linear_sum_assignment((a @ b.T).numpy(), maximize=True)
        return r, c, "exact"
    (row_val, row_idx), (col_val, col_idx) = rows, cols
    n = min(n_a, n_b)
    src = np.concatenate([np.repeat(np.arange(n_a), row_idx.shape[1]), col_idx.numpy().ravel(), np.arange(n)])
    dst = np.concatenate([row_idx.numpy().ravel(), np.tile(np.arange(n_b), col_idx.shape[0]), np.arange(n)])
    val = np.concatenate([row_val.numpy().ravel(), col_val.numpy().ravel(), (a[:n] * b[:n]).sum(-1).numpy()])
    _, first = np.unique(src.astype(np.int64) * n_b + dst, return_index=True)  # coo would add up duplicates
    graph = coo_matrix((2.0 - val[first], (src[first], dst[first])), shape=(n_a, n_b)).tocsr()  # weights > 0
    r, c = min_weight_full_bipartite_matching(graph)
    return r, c, "candidates"


def _above(x: np.ndarray) -> dict[str, float]:
    return {str(t): float((x > t).mean()) if len(x) else 0.0 for t in THRESHOLDS}


def compare_saes(sae_a: SparseAutoencoder, sae_b: SparseAutoencoder, aligned: bool = False,
                 max_match: int = MAX_MATCH, candidates: int = CANDIDATES, refuse_widths: bool = True) -> dict:
    """Compare two SAEs by their decoders (see the module docstring). `aligned`: latent i of A and latent i of B
    are one latent (the sources of a merged folder). Returns the numbers, plus numpy arrays under "per_latent"
    (max cosines both ways, the matching, and for aligned SAEs the cosines and relative norms of latent i).
    `refuse_widths` False: SAEs of different widths get no decoder measures instead of an error."""
    if max_match < 1:
        raise UserError(f"--max-match: {max_match}; expected a positive number of latents")
    d = {side: {"d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae} for side, sae in (("a", sae_a), ("b", sae_b))}
    if aligned and d["a"]["d_sae"] != d["b"]["d_sae"]:
        raise UserError(f"--aligned: A has {d['a']['d_sae']} latents and B {d['b']['d_sae']}; expected as many "
                        "(latent i of A is latent i of B)")
    same_width = d["a"]["d_in"] == d["b"]["d_in"]
    if not aligned and not same_width and refuse_widths:
        raise UserError(f"B: d_in {d['b']['d_in']}, A's is {d['a']['d_in']}; expected the same width (decoder "
                        "directions of residual streams of different widths have no cosine)")
    result, per_latent = {**d, "aligned": aligned, "decoder_cosines": same_width}, {}
    if same_width:
        a, b = _unit_rows(sae_a), _unit_rows(sae_b)
        rows, cols = _scan(a, b, candidates)
        per_latent["max_cosine_a"], per_latent["max_cosine_b"] = rows[0][:, 0].numpy(), cols[0][0].numpy()
        result["mmcs"] = {"a_to_b": float(rows[0][:, 0].mean()), "b_to_a": float(cols[0][0].mean()),
                          "chance_a_to_b": _chance_mmcs(d["a"]["d_in"], d["b"]["d_sae"]),
                          "chance_b_to_a": _chance_mmcs(d["a"]["d_in"], d["a"]["d_sae"])}
        r, c, method = _match(a, b, rows, cols, max_match)
        matched = (a[r] * b[c]).sum(-1).numpy()
        per_latent |= {"match_a": r, "match_b": c, "matched_cosine": matched}
        result["matching"] = {"method": method, "max_match": max_match, "candidates": candidates, "pairs": len(r),
                              "mean_cosine": float(matched.mean()), "above": _above(matched)}
        if aligned:
            cos = (a * b).sum(-1).numpy()
            per_latent["aligned_cosine"] = cos
            result["matching"]["same_index"] = float((r == c).mean())
            result["aligned_cosine"] = {"mean": float(cos.mean()), "above": _above(cos)}
    if aligned:
        norm_a, norm_b = (s.W_dec.detach().float().cpu().norm(dim=-1).numpy() for s in (sae_a, sae_b))
        total = norm_a + norm_b
        rel = np.where(total > 0, norm_a / np.where(total > 0, total, 1), np.nan)  # nan: dead in both
        per_latent["relative_norm"] = rel
        live = rel[~np.isnan(rel)]
        result["relative_norm"] = {
            "mean": float(live.mean()) if len(live) else None, "std": float(live.std()) if len(live) else None,
            "a_only": float((live > 0.9).mean()) if len(live) else 0.0,  # fractions of the latents with a row
            "b_only": float((live < 0.1).mean()) if len(live) else 0.0,
            "shared": float(((live >= 0.3) & (live <= 0.7)).mean()) if len(live) else 0.0,
            "zero_in_both": int(np.isnan(rel).sum())}
    result["per_latent"] = per_latent
    return result


# --- inputs -------------------------------------------------------------------------------------------------
def _merged_sites(root: Path) -> list[dict[str, Path]] | None:
    """The SAE folders of a merged model folder, one {source: folder} per site; None if `root` is not one.
    Sites come from metrics.json (a site's sources may read different module paths), else by module path."""
    folders = sorted(cfg.parent for cfg in root.glob("saes/*/*/cfg.json"))
    if not folders:
        return None
    try:
        sites = [{src: root / "saes" / src / path for src, path in site["layers"].items()}
                 for site in json.loads((root / "metrics.json").read_text())["sites"]]
        if sites and all(f.is_dir() for site in sites for f in site.values()):
            return sites
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    by_path: dict[str, dict[str, Path]] = {}
    for folder in folders:
        by_path.setdefault(folder.name, {})[folder.parent.name] = folder
    return list(by_path.values())


def _site_of(folder: Path) -> tuple[Path, int] | None:
    """(merged folder, site) of an SAE folder at <merged>/saes/<source>/<module path>, else None."""
    folder = folder.resolve()
    if folder.parent.parent.name != "saes":
        return None
    root = folder.parent.parent.parent
    for i, site in enumerate(_merged_sites(root) or []):
        if folder in {f.resolve() for f in site.values()}:
            return root, i
    return None


def _load(path: Path, arg: str) -> SparseAutoencoder:
    if not path.exists():
        raise UserError(f"{arg}: '{path}' does not exist; expected {SAE_FOLDER} or a merged model folder")
    try:
        return import_sae(path)
    except (ValueError, OSError, TypeError, KeyError, RuntimeError, SafetensorError) as e:
        raise UserError(f"{arg}: '{path}': {e}") from None


def _inputs(a_path: Path, b_path: Path | None, aligned: bool | None) -> list[dict]:
    """The pairs to compare: {a, b: {name, path, sae}, aligned, site}."""
    if b_path is None:
        sites = _merged_sites(a_path) if a_path.is_dir() else None
        if sites is None:
            if not a_path.exists():
                raise UserError(f"A: '{a_path}' does not exist; expected a merged model folder, or two SAE folders")
            if not (a_path / "cfg.json").is_file():
                raise UserError(f"A: '{a_path}' is not a merged model folder (no saes/<source>/<module path>/); "
                                "expected one, or two SAE folders A and B")
            raise UserError("B: missing; an SAE folder A needs an SAE folder B to compare with (or give a merged "
                            "model folder as A alone)")
        pairs = []
        for site in sites:
            for x, y in itertools.combinations(site, 2):
                pairs.append({"a": {"name": x, "path": site[x]}, "b": {"name": y, "path": site[y]},
                              "aligned": aligned is not False, "site": " / ".join(dict.fromkeys(
                                  [site[x].name, site[y].name]))})
        if not pairs:
            raise UserError(f"A: '{a_path}' is a merged model folder without two sources' SAEs at one site; "
                            "expected two or more sources (or give two SAE folders)")
        for pair in pairs:
            for side in ("a", "b"):
                pair[side]["sae"] = _load(pair[side]["path"], "A")
        return pairs
    pair = {"aligned": aligned, "site": None}
    for arg, path in (("A", a_path), ("B", b_path)):
        if path.is_dir() and _merged_sites(path) is not None and not (path / "cfg.json").is_file():
            example = next(iter(_merged_sites(path)[0].values())).relative_to(path)
            raise UserError(f"{arg}: '{path}' is a merged model folder; with two arguments expected {SAE_FOLDER}, "
                            f"e.g. '{path / example}' (or give the merged folder alone)")
        pair[arg.lower()] = {"name": arg, "path": path, "sae": _load(path, arg)}
    if aligned is None:  # two SAEs of one site of one merged folder share its latent space
        site_a, site_b = _site_of(a_path), _site_of(b_path)
        pair["aligned"] = site_a is not None and site_a == site_b
    return [pair]


def _different_models(root: Path, x: str, y: str) -> bool:
    import yaml

    try:
        models = {m["name"]: m["model"] for m in yaml.safe_load((root / "recipe.yaml").read_text())["models"]}
        return models[x] != models[y]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return False


def _activation_inputs(pair: dict, merged: Path | None, model_a, model_b, layer_a, layer_b, data,
                       seq_len: int | None) -> dict:
    """What the activation measures of one pair read: per side (model reference, tokenizer reference, layer),
    the data and seq_len. From the recipe.yaml of the merged folder `merged` (or of the one an SAE folder sits
    in), else from the arguments, else from a SAELens cfg.json (model_name, hook_name blocks.<i>.hook_resid_*)."""
    from .recipe import SAERecipe, SourceSpec, load_recipe

    given = {"a": (model_a, layer_a), "b": (model_b, layer_b)}
    if merged is not None and any(v is not None for v in (model_a, model_b, layer_a, layer_b)):
        raise UserError("--model-a: only for two SAE folders; a merged folder's models and layers come from its "
                        "recipe.yaml")
    out, recipe_data = {}, None
    for side in ("a", "b"):
        folder, name = pair[side]["path"], pair[side]["name"]
        root = merged if merged is not None else (_site_of(folder) or (None,))[0]
        model, layer = given[side]
        spec = None
        if root is not None and (model is None or layer is None):
            file = root / "recipe.yaml"
            if not file.is_file():
                raise UserError(f"{'A' if merged else side.upper()}: '{root}' has no recipe.yaml; expected one naming "
                                "the models (or give --model-a, --model-b, --layer-a, --layer-b)")
            recipe = load_recipe(file, schema=SAERecipe)
            source = name if merged is not None else folder.resolve().parent.name
            spec = recipe.source(source)
            recipe_data = recipe_data or recipe.data
            if layer is None:
                layer = ".".join(folder.resolve().relative_to((root / "saes" / source).resolve()).parts)
        cfg = _saelens_cfg(folder)
        if layer is None and cfg.get("hook_name"):
            found = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(post|out)", cfg["hook_name"])
            layer = int(found.group(1)) if found else None
        if model is None and spec is None:
            model = cfg.get("model_name") if cfg.get("model_name") and Path(cfg["model_name"]).exists() else None
        if model is None and spec is None:
            raise UserError(f"--model-{side}: missing; expected the model whose residual SAE {side.upper()} reads (a "
                            "local folder), for the activation measures")
        if layer is None:
            raise UserError(f"--layer-{side}: missing; expected the block index or module path SAE {side.upper()} "
                            "reads, for the activation measures")
        if model is not None:
            spec = SourceSpec(name="source", model=str(model), layer=0)
        out[side] = (spec, f"--model-{side}", layer)
    if data is None and recipe_data is None:
        raise UserError(f"--data: missing; expected {DATA_FILE} (SAE folders outside a merged folder have no recipe "
                        "data)")
    seq_len = seq_len or (recipe_data.seq_len if recipe_data is not None else 128)
    out["data"] = data_spec(data, seq_len) if data is not None else recipe_data.model_copy(update={"seq_len": seq_len})
    out["seq_len"] = seq_len
    return out


def _saelens_cfg(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
        return cfg if isinstance(cfg, dict) else {}
    except (OSError, ValueError):
        return {}


def _tokenizer(spec, arg: str):
    from .sources import load_tokenizer, one_line

    try:
        return load_tokenizer(spec)
    except Exception as e:
        raise UserError(f"{arg}: cannot load a tokenizer from '{spec.model}': {one_line(e)}; expected a Hugging Face "
                        "causal LM with its tokenizer") from None


def _loaded(cache: dict, spec, arg: str, layer) -> tuple:
    """(model, tokenizer) of a SourceSpec, loaded once per reference."""
    from .sources import load_source, load_tokenizer, one_line

    key = (spec.model, spec.revision, spec.adapter, spec.gguf_file, spec.dtype)
    if key not in cache:
        try:
            cache[key] = (load_source(spec), load_tokenizer(spec))
        except Exception as e:
            raise UserError(f"{arg}: cannot load '{spec.model}': {one_line(e)}; expected a Hugging Face causal LM") \
                from None
    return cache[key]


# --- report -------------------------------------------------------------------------------------------------
def analyze(a_path: str | Path, b_path: str | Path | None = None, output: str | Path | None = None,
            aligned: bool | None = None, max_match: int = MAX_MATCH, overwrite: bool = False,
            activations: bool = False, data: str | Path | None = None, tokens: int = TOKENS,
            model_a: str | None = None, model_b: str | None = None, layer_a: int | str | None = None,
            layer_b: int | str | None = None, seq_len: int | None = None, progress: bool = True) -> dict:
    """Compare A and B (two SAE folders in saemerge, SAELens or sparsify format), or the sources' SAEs at each
    site of a merged folder A given alone. `aligned` None: aligned when the SAEs come from one site of one merged
    folder. With `output`, write analysis.json, analysis.md and PNG plots there (a new folder, written beside it
    and renamed into place; an existing one is replaced only with `overwrite`). Returns the report: the numbers
    of each comparison, with per-latent numpy arrays under "per_latent" (left out of analysis.json).

    `activations` (or `data`): also the activation measures (activation_measures.compare_activations) on `tokens`
    tokens of `data` (a .jsonl/.jsonl.gz/.txt file; default: the merged folder's recipe data). The models and
    layers come from the merged folder's recipe.yaml (also for SAE folders inside one), else from `model_a`,
    `model_b`, `layer_a`, `layer_b` (or a SAELens cfg.json's model_name and hook_name)."""
    start = time.perf_counter()
    a_path, b_path = Path(a_path), None if b_path is None else Path(b_path)
    output = None if output is None else Path(output)
    refuse_existing(output, overwrite)
    if max_match < 1:
        raise UserError(f"--max-match: {max_match}; expected a positive number of latents")
    activations = activations or data is not None
    if activations and tokens < 1:
        raise UserError(f"--tokens: {tokens}; expected a positive number of tokens")
    if data is not None:
        data_spec(data)  # refuse a missing file before loading anything
    report = {"a": str(a_path), "b": None if b_path is None else str(b_path), "comparisons": []}
    loaded: dict = {}  # models by reference, loaded once for every pair
    pairs = _inputs(a_path, b_path, aligned)
    sources = [_activation_inputs(pair, a_path if b_path is None else None, model_a, model_b, layer_a, layer_b,
                                  data, seq_len) for pair in pairs] if activations else [None] * len(pairs)
    for pair, source in zip(pairs, sources):
        result = compare_saes(pair["a"]["sae"], pair["b"]["sae"], pair["aligned"], max_match,
                              refuse_widths=not activations)
        if source is not None:
            # The same token ids on the data? Asked before the models load.
            check_tokenizers(*(_tokenizer(*source[side][:2]) for side in ("a", "b")), sample_texts(source["data"]))
            models = {side: _loaded(loaded, *source[side]) for side in ("a", "b")}
            acts = compare_activations(models["a"][0], models["b"][0], source["a"][2], source["b"][2],
                                       pair["a"]["sae"], pair["b"]["sae"], source["data"], pair["aligned"], tokens,
                                       source["seq_len"], tokenizer_a=models["a"][1], tokenizer_b=models["b"][1],
                                       progress=progress)
            result["per_latent"]["activations"] = acts.pop("per_latent")
            result["activations"] = acts
        for side in ("a", "b"):
            result[side] = {"name": pair[side]["name"], "path": str(pair[side]["path"]), **result[side]}
        result["site"] = pair["site"]
        result["notes"] = []
        if b_path is None and result["decoder_cosines"] and _different_models(a_path, pair["a"]["name"],
                                                                               pair["b"]["name"]):
            result["notes"].append(f"{pair['a']['name']} and {pair['b']['name']} are different models: their decoder "
                                   "cosines mean something only if the models share a residual basis (e.g. a base "
                                   "model and its fine-tune)")
        report["comparisons"].append(result)
    multiple = len(report["comparisons"]) > 1
    for result in report["comparisons"]:
        label = f"{result['a']['name']}-{result['b']['name']}-{result['site']}" if multiple else ""
        prefix = re.sub(r"[^A-Za-z0-9._-]+", "_", label) + "_" if multiple else ""
        acts = result.get("activations", {})
        result["plots"] = {name: f"{prefix}{name}.png" for name, present in [
            ("max_cosine", "mmcs" in result), ("matched_cosine", "matching" in result),
            ("relative_norm", "relative_norm" in result), ("firing_rate", "firing" in acts),
            ("activation_matching", "pairs" in acts.get("matching", {})), ("cofiring", "cofiring" in acts),
            ("cross", "cross" in acts), ("latent_map", "latent_map" in acts)] if present}
    report["compute_seconds"] = round(time.perf_counter() - start, 2)
    if output is not None:
        _write(report, output, overwrite)
    return report


def summary(report: dict) -> str:
    """The markdown summary: per comparison, a heading and one line per measure."""
    acts = any("activations" in r for r in report["comparisons"])
    lines = [f"# SAE dictionaries compared by their decoder directions{' and activations' if acts else ''}", ""]
    for r in report["comparisons"]:
        a, b = r["a"]["name"], r["b"]["name"]
        site = f" at {r['site']}" if r["site"] else ""
        aligned = " (aligned: latent i of one is latent i of the other)" if r["aligned"] else ""
        lines += [f"## {a} vs {b}{site}{aligned}", ""]
        for side in ("a", "b"):
            s = r[side]
            lines.append(f"- {s['name']}: `{s['path']}`, d_in {s['d_in']}, {s['d_sae']} latents")
        lines += [f"- note: {note}" for note in r["notes"]]
        if not r["decoder_cosines"]:
            lines.append(f"- decoder cosines: skipped, {a} has d_in {r['a']['d_in']} and {b} {r['b']['d_in']} "
                         "(directions in residual streams of different widths have no cosine)")
        if "mmcs" in r:
            m = r["mmcs"]
            chance = (f"{m['chance_a_to_b']:.3f}" if m["chance_a_to_b"] == m["chance_b_to_a"] else
                      f"{m['chance_a_to_b']:.3f} and {m['chance_b_to_a']:.3f}")
            lines.append(f"- mean max cosine (MMCS): {a}->{b} {m['a_to_b']:.3f}, {b}->{a} {m['b_to_a']:.3f} (1: every "
                         f"decoder direction has a twin in the other; random directions: {chance}) "
                         f"[plot]({r['plots']['max_cosine']})")
        if "matching" in r:
            m = r["matching"]
            how = ("exact" if m["method"] == "exact" else
                   f"over each latent's {m['candidates']} nearest partners, as more than --max-match "
                   f"{m['max_match']} latents")
            lines.append(f"- one-to-one matching (Hungarian, {how}; {m['pairs']} pairs): mean cosine "
                         f"{m['mean_cosine']:.3f}; {_fractions(m['above'])} [plot]({r['plots']['matched_cosine']})")
        if "aligned_cosine" in r:
            c = r["aligned_cosine"]
            lines.append(f"- latent i vs latent i: mean cosine {c['mean']:.3f}; {_fractions(c['above'])}; "
                         f"Hungarian pairs {r['matching']['same_index']:.1%} of latents with their own index")
        if "relative_norm" in r:
            n = r["relative_norm"]
            zero = f"; {n['zero_in_both']} latents with zero rows in both left out" if n["zero_in_both"] else ""
            if n["std"] is not None and n["std"] < 1e-3:
                lines.append(f"- relative decoder norm |d_{a}| / (|d_{a}| + |d_{b}|): {n['mean']:.3f} for every "
                             "latent: the rows all have the same norm in both (saemerge's trainer keeps them at 1), "
                             f"so it cannot tell shared latents from one-sided ones here{zero} "
                             f"[plot]({r['plots']['relative_norm']})")
            else:
                lines.append(f"- relative decoder norm |d_{a}| / (|d_{a}| + |d_{b}|): {n['a_only']:.1%} of latents "
                             f"{a}'s alone (> 0.9), {n['b_only']:.1%} {b}'s alone (< 0.1), {n['shared']:.1%} shared "
                             f"(0.3-0.7){zero} [plot]({r['plots']['relative_norm']})")
        if "activations" in r:
            lines += summary_lines(r["activations"], a, b, r["plots"])
        lines.append("")
    return "\n".join(lines)


def _fractions(above: dict[str, float]) -> str:
    return ", ".join(f"{above[str(t)]:.1%} above {t}" for t in reversed(THRESHOLDS))


def _write(report: dict, output: Path, overwrite: bool) -> None:
    """analysis.json, analysis.md and the plots into a hidden folder beside `output`, then renamed into place."""
    from .analysis_plots import plot_comparison

    with new_folder(output, overwrite) as tmp:
        numbers = {**report, "comparisons": [{k: v for k, v in r.items() if k != "per_latent"}
                                             for r in report["comparisons"]]}
        (tmp / "analysis.json").write_text(json.dumps(numbers, indent=2, allow_nan=False))
        (tmp / "analysis.md").write_text(summary(report))
        for result in report["comparisons"]:
            plot_comparison(result, tmp)
