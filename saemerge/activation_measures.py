"""Activation-based comparison of two SAEs: both sources read the same tokens, and their latents are compared by
what they do there, not by their decoder weights. This works for SAEs of different models (with one tokenizer),
where decoder cosines mean nothing.

Measures (`compare_activations`), each one summary line and one plot in `saemerge analyze`:
- Firing rates: the share of tokens on which each latent is active (code > 0), per source. For aligned SAEs
  (latent i of A is latent i of B) each latent's rate share s = f_A / (f_A + f_B) sorts it: A's alone when
  s > 0.9 (it fires at least 9 times as often in A as in B), B's alone when s < 0.1, shared in between; dead
  when it fires on no token in either.
- Co-firing: the Jaccard index of the token sets where two latents fire, |both| / |either|, for latent i vs
  latent i (aligned) or the pairs of the activation matching, with the Jaccard independent firing at the same
  rates would give (f_A f_B / (f_A + f_B - f_A f_B)) as the floor.
- Activation matching: the Pearson correlation of every latent of A with every latent of B over the tokens,
  for the latents that fire on at least `min_fires` tokens; mean max correlation both ways; a one-to-one
  (Hungarian) matching maximising the summed correlation, and the fraction of its pairs above 0.5 / 0.7 / 0.9.
- Cross-reconstruction: A's code mapped to B's latents (aligned: identity; else each matched pair, scaled by the
  least-squares factor sum z_A z_B / sum z_A^2) and decoded by B's SAE, against B's residual: explained variance
  (B's own SAE is the baseline), and the next-token loss (CE) of model B with that reconstruction spliced in at
  the SAE's layer, beside B clean, B with its own SAE's reconstruction and B with its residual replaced by its
  mean. CE recovered = (CE_mean - CE_x) / (CE_mean - CE_clean). Both directions.
- Latent map: a sparse linear map from A's codes to B's codes (see latent_map.py).

Position 0 of each sequence is left out everywhere (as the SAEs are trained, harvest.py), and kept as it is when a
residual is spliced in. The tokens are the same for every measure; the latent map holds out the last 20% of them.

Memory: the token ids, and both SAEs' codes as sparse CSR matrices (tokens x active latents x 12 bytes: 50k tokens
with 32 active latents are 19 MB a side); the residuals only one batch at a time. The correlation needs a dense
d_A x d_B float64 matrix of summed products (8 MB at 1024^2, 134 MB at 4096^2, 2 GB at 16384^2) accumulated from
the sparse codes, and the Hungarian matching O(n^3) time on the latents that fire (seconds at 4096).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from .errors import UserError
from .hooks import ResidualHook, resolve_layer
from .latent_map import L1 as MAP_L1, STEPS as MAP_STEPS, csr_rows, fit_latent_map, stack_csr
from .sae import SparseAutoencoder

THRESHOLDS = (0.5, 0.7, 0.9)
ONE_SIDED = 0.9  # rate share above which a latent is one source's alone (below 1 - ONE_SIDED: the other's)
MIN_FIRES = 10
TOKENS = 32768
DATA_FILE = 'a .jsonl, .jsonl.gz or .txt file (json rows with a "text" field, or lines of text)'


# --- inputs -------------------------------------------------------------------------------------------------
def data_spec(path: str | Path, seq_len: int = 128):
    """A DataSpec reading one local file (json lines with "text", or plain text)."""
    from .recipe import DataSpec

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data: '{path}' does not exist; expected {DATA_FILE}")
    name = path.name.lower().removesuffix(".gz")
    builder = "json" if name.endswith((".jsonl", ".json")) else "text" if name.endswith(".txt") else None
    if builder is None:
        raise UserError(f"--data: '{path}' has an unknown extension; expected {DATA_FILE}")
    return DataSpec(datasets=[{"path": builder, "data_files": str(path)}], seq_len=seq_len, shuffle_buffer=100)


def sample_texts(spec, n: int = 16) -> list[str]:
    """A few documents of the data (the first dataset of the mixture), to compare tokenizers on."""
    from .data import open_mixture

    texts = []
    for row in open_mixture(spec, seed=0)[0]:
        if row["text"]:
            texts.append(row["text"][:2000])
        if len(texts) == n:
            break
    return texts


def check_tokenizers(tokenizer_a, tokenizer_b, texts: list[str]) -> None:
    """Refuse two tokenizers that give different token ids on the data: the tokens would not be the same."""
    for text in texts:
        if tokenizer_a(text)["input_ids"] != tokenizer_b(text)["input_ids"]:
            raise UserError(f"--model-b: its tokenizer gives other token ids than A's on the data ({text[:30]!r}...); "
                            "expected two models with the same tokenizer (the activation measures compare latents on "
                            "the same tokens)")


def token_list(data, tokenizer_a, tokenizer_b, tokens: int, seq_len: int = 128, batch_size: int = 16,
               seed: int = 0) -> list[torch.Tensor]:
    """[sequences, seq_len] id batches holding `tokens` measured positions (position 0 of each sequence is not
    measured). `data`: a file, a DataSpec (its seq_len is used), or an iterable of id batches."""
    from .data import token_batches
    from .recipe import DataSpec

    if tokens < 1:
        raise UserError(f"--tokens: {tokens}; expected a positive number of tokens")
    if isinstance(data, (str, Path)):
        data = data_spec(data, seq_len)
    if isinstance(data, DataSpec):
        check_tokenizers(tokenizer_a, tokenizer_b, sample_texts(data))
        data = token_batches(data, tokenizer_a, batch_size, seed)
    out, measured = [], 0
    for ids in data:
        ids = torch.as_tensor(ids, dtype=torch.long)
        keep = min(len(ids), math.ceil((tokens - measured) / (ids.shape[1] - 1)))
        out.append(ids[:keep])
        measured += keep * (ids.shape[1] - 1)
        if measured >= tokens:
            return out
    if not out:
        raise UserError("data: no token batches; expected at least one")
    return out


# --- measures -----------------------------------------------------------------------------------------------
def _next_token_loss(model, path: str, ids: torch.Tensor, replacement: torch.Tensor | None = None):
    """Summed next-token CE over the predictions from positions 1.. (those whose residual can be replaced), and
    the residual at `path`. `replacement` [tokens, d]: spliced in at positions 1.. (position 0 kept)."""
    def splice(h):
        return torch.cat([h[:, :1], replacement.reshape(h.shape[0], -1, h.shape[-1]).to(h)], 1)

    hook = ResidualHook(model, path, "capture") if replacement is None else ResidualHook(model, path, "replace",
                                                                                        sae=splice)
    ids = ids.to(model.device)
    with hook:
        logits = model(input_ids=ids, use_cache=False).logits
    ce = F.cross_entropy(logits[:, 1:-1].flatten(0, 1).float(), ids[:, 2:].flatten(), reduction="sum").item()
    return ce, hook.captured


def _mapped(z: torch.Tensor, mapping: tuple[torch.Tensor, torch.Tensor, torch.Tensor], d_out: int) -> torch.Tensor:
    """Codes [tokens, d_in] carried to the other dictionary: out[:, dst] = z[:, src] * scale."""
    src, dst, scale = mapping
    out = z.new_zeros(len(z), d_out)
    out[:, dst] = z[:, src] * scale.to(z)
    return out


def _fractions(x: np.ndarray) -> dict[str, float]:
    return {str(t): float((x > t).mean()) if len(x) else 0.0 for t in THRESHOLDS}


def _load_sae(sae, arg: str) -> SparseAutoencoder:
    if isinstance(sae, SparseAutoencoder):
        return sae
    from .analyze import _load

    return _load(Path(sae), arg)


def _load_model(model, arg: str):
    if not isinstance(model, (str, Path)):
        return model, None
    from .recipe import SourceSpec
    from .sources import load_source, load_tokenizer, one_line

    spec = SourceSpec(name="source", model=str(model), layer=0)
    try:
        return load_source(spec), load_tokenizer(spec)
    except Exception as e:
        raise UserError(f"{arg}: cannot load '{model}': {one_line(e)}; expected a Hugging Face causal LM "
                        "(a local folder)") from None


@torch.no_grad()
def compare_activations(model_a, model_b, layer_a: int | str, layer_b: int | str, sae_a, sae_b, data,
                        aligned: bool = False, tokens: int = TOKENS, seq_len: int = 128, batch_size: int = 16,
                        min_fires: int = MIN_FIRES, map_steps: int = MAP_STEPS, map_l1: float = MAP_L1, seed: int = 0,
                        tokenizer_a=None, tokenizer_b=None, progress: bool = True) -> dict:
    """Compare SAE A (on model A's residual at `layer_a`) and SAE B (model B, `layer_b`) on the same tokens (see
    the module docstring).

    model_a, model_b: loaded causal LMs or local folders (may be one model); layers: block index or module path;
    sae_a, sae_b: SparseAutoencoders or SAE folders (saemerge, SAELens, sparsify); data: a .jsonl/.jsonl.gz/.txt
    file, a DataSpec, or an iterable of [sequences, seq_len] token id batches (then no tokenizer is needed);
    aligned: latent i of A is latent i of B (the sources of one merged folder).

    Returns a dict of numbers: "tokens", "firing" (rates, and for aligned SAEs the fractions shared / a_only /
    b_only / dead), "cofiring", "matching" (mean max correlation both ways, matched fractions above 0.5/0.7/0.9),
    "cross" ({"a->b", "b->a"}: explained variance and CE recovered with their baselines), "latent_map" (fit,
    nonzeros per row, diagonal share); and numpy arrays per latent under "per_latent"."""
    model_a, tok_a = _load_model(model_a, "--model-a")
    model_b, tok_b = (model_a, tok_a) if model_b is model_a else _load_model(model_b, "--model-b")
    tok_a, tok_b = tokenizer_a or tok_a, tokenizer_b or tok_b
    if not isinstance(data, Iterable) or isinstance(data, (str, Path)) or hasattr(data, "datasets"):
        if tok_a is None or tok_b is None:
            from transformers import AutoTokenizer

            tok_a = tok_a or AutoTokenizer.from_pretrained(model_a.name_or_path)
            tok_b = tok_b or AutoTokenizer.from_pretrained(model_b.name_or_path)
    saes = {"a": _load_sae(sae_a, "A"), "b": _load_sae(sae_b, "B")}
    if aligned and saes["a"].cfg.d_sae != saes["b"].cfg.d_sae:
        raise UserError(f"--aligned: A has {saes['a'].cfg.d_sae} latents and B {saes['b'].cfg.d_sae}; expected as "
                        "many (latent i of A is latent i of B)")
    models = {"a": model_a, "b": model_b}
    paths = {}
    for s, layer in (("a", layer_a), ("b", layer_b)):
        try:
            paths[s] = resolve_layer(models[s], layer)
        except ValueError as e:
            raise UserError(f"--layer-{s}: {e}") from None
    batches = token_list(data, tok_a, tok_b, tokens, seq_len, batch_size, seed)
    d = {s: saes[s].cfg.d_sae for s in saes}

    from .harvest import activations  # imports `datasets`: only when measuring

    # Pass 1: residuals up to the layers only; codes kept sparse, residual sums for the mean, summed products.
    codes, total = {"a": [], "b": []}, {}
    products = torch.zeros(d["a"], d["b"], dtype=torch.float64)
    for ids in tqdm(batches, desc="codes", disable=not progress, leave=False):
        x = activations(models, {s: [paths[s]] for s in models}, ids)[0]
        for s in x:
            if x[s].shape[-1] != saes[s].cfg.d_in:
                raise UserError(f"--layer-{s}: the residual at {paths[s]} has width {x[s].shape[-1]}; SAE "
                                f"{s.upper()} reads d_in {saes[s].cfg.d_in}")
        z = {s: saes[s].encode(x[s]).float() for s in x}
        for s in x:
            total[s] = total.get(s, 0) + x[s].double().sum(0)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": the few calls used here are stable
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                codes[s].append(z[s].to_sparse_csr())
        products += torch.sparse.mm(z["a"].T.to_sparse(), z["b"]).double()
    z = {s: stack_csr(codes[s]) for s in codes}
    n = z["a"].shape[0]
    mean_x = {s: (total[s] / n).float() for s in total}
    count = {s: torch.bincount(z[s].col_indices(), minlength=d[s]) for s in z}
    sums = {s: torch.zeros(d[s], dtype=torch.float64).index_add_(0, z[s].col_indices(), z[s].values().double())
            for s in z}
    squares = {s: torch.zeros(d[s], dtype=torch.float64).index_add_(0, z[s].col_indices(),
                                                                      z[s].values().double() ** 2) for s in z}
    rate = {s: (count[s].double() / n).numpy() for s in z}
    result = {"tokens": n, "sequences": sum(len(b) for b in batches), "seq_len": batches[0].shape[1],
              "layers": paths, "min_fires": min_fires}
    per_latent = {"rate_a": rate["a"], "rate_b": rate["b"]}

    # Firing rates and, for aligned SAEs, which latents are shared.
    firing = {s: {"mean_rate": float(rate[s].mean()), "l0": float(count[s].sum() / n),
                  "dead": float((count[s] == 0).double().mean())} for s in z}
    if aligned:
        either = (count["a"] + count["b"]) > 0
        share = np.where(either.numpy(), rate["a"] / np.maximum(rate["a"] + rate["b"], 1e-300), np.nan)
        live = share[either.numpy()]
        per_latent["rate_share"] = share
        firing |= {"one_sided": ONE_SIDED, "a_only": float((live > ONE_SIDED).sum() / len(share)),
                   "b_only": float((live < 1 - ONE_SIDED).sum() / len(share)),
                   "shared": float(((live >= 1 - ONE_SIDED) & (live <= ONE_SIDED)).sum() / len(share)),
                   "dead_in_both": float((~either).double().mean())}
    result["firing"] = firing

    # Activation matching: Pearson correlation from the summed products.
    mean = {s: sums[s] / n for s in z}
    std = {s: (squares[s] / n - mean[s] ** 2).clamp_min(0).sqrt() for s in z}
    corr = (products / n - mean["a"][:, None] * mean["b"][None]) / (std["a"][:, None] * std["b"][None]).clamp_min(1e-30)
    live = {s: torch.nonzero(count[s] >= min_fires).flatten() for s in z}
    matching = {"live_a": len(live["a"]), "live_b": len(live["b"])}
    if len(live["a"]) and len(live["b"]):
        c = corr[live["a"]][:, live["b"]].numpy()
        rows, cols = linear_sum_assignment(c, maximize=True)
        matched = c[rows, cols]
        r, k = live["a"][rows], live["b"][cols]
        matching |= {"mmc_a_to_b": float(c.max(1).mean()), "mmc_b_to_a": float(c.max(0).mean()),
                     "pairs": len(rows), "mean_matched": float(matched.mean()), "above": _fractions(matched)}
        per_latent |= {"max_corr_a": c.max(1), "max_corr_b": c.max(0), "matched_corr": matched,
                       "act_match_a": r.numpy(), "act_match_b": k.numpy()}
        if aligned:
            both = torch.nonzero((count["a"] >= min_fires) & (count["b"] >= min_fires)).flatten()
            diagonal = corr[both, both].numpy()
            matching |= {"same_index": float((r == k).double().mean()),
                         "diagonal_mean": float(diagonal.mean()) if len(diagonal) else 0.0,
                         "diagonal_above": _fractions(diagonal), "diagonal_latents": len(both)}
            per_latent["diagonal_corr"] = diagonal
    result["matching"] = matching

    # The map of codes between dictionaries, for co-firing and cross-reconstruction.
    if aligned:
        index = torch.arange(d["a"])
        maps = {"a->b": (index, index, torch.ones(d["a"])), "b->a": (index, index, torch.ones(d["a"]))}
    elif "act_match_a" in per_latent:
        r, k = torch.as_tensor(per_latent["act_match_a"]), torch.as_tensor(per_latent["act_match_b"])
        maps = {"a->b": (r, k, (products[r, k] / squares["a"][r].clamp_min(1e-30)).float()),
                "b->a": (k, r, (products[r, k] / squares["b"][k].clamp_min(1e-30)).float())}
    else:
        maps = None
    result["mapping"] = "identity: latent i to latent i" if aligned else (
        "activation matching: each pair scaled by its least-squares factor" if maps else None)

    # Co-firing of the mapped pairs.
    if maps:
        pa, pb = maps["a->b"][0], maps["a->b"][1]
        both = torch.zeros(len(pa), dtype=torch.long)
        for s in range(0, n, 4096):
            e = min(s + 4096, n)
            fires_a, fires_b = (csr_rows(z[side], s, e).to_dense()[:, p] > 0 for side, p in (("a", pa), ("b", pb)))
            both += (fires_a & fires_b).sum(0)
        union = count["a"][pa] + count["b"][pb] - both
        fired = union > 0
        jaccard = (both[fired].double() / union[fired]).numpy()
        fa, fb = rate["a"][pa.numpy()][fired.numpy()], rate["b"][pb.numpy()][fired.numpy()]
        chance = fa * fb / np.maximum(fa + fb - fa * fb, 1e-300)
        result["cofiring"] = {"pairs": "latent i vs latent i" if aligned else "activation matching",
                              "fired": int(fired.sum()), "mean_jaccard": float(jaccard.mean()) if len(jaccard) else 0.0,
                              "chance": float(chance.mean()) if len(chance) else 0.0, "above": _fractions(jaccard)}
        per_latent["jaccard"] = jaccard

    # Pass 2: cross-reconstruction, explained variance and next-token loss, both ways.
    if maps:
        err = {key: 0.0 for key in ("own_a", "own_b", "cross_a->b", "cross_b->a", "var_a", "var_b")}
        ce = {f"{key}_{s}": 0.0 for key in ("clean", "own", "cross", "mean") for s in "ab"}
        predicted = 0
        # Sequences per forward, so that one forward's logits stay under 2^26 floats (256 MB) whatever the vocab.
        vocab = max(m.get_output_embeddings().weight.shape[0] for m in models.values())
        chunk = max(1, 2 ** 26 // (batches[0].shape[1] * vocab))
        parts = [part for ids in batches for part in ids.split(chunk)]
        for ids in tqdm(parts, desc="cross-reconstruction", disable=not progress, leave=False):
            x, zz = {}, {}
            for s in "ab":
                loss, h = _next_token_loss(models[s], paths[s], ids)
                ce[f"clean_{s}"] += loss
                x[s] = h[:, 1:].reshape(-1, h.shape[-1]).float()
                zz[s] = saes[s].encode(x[s]).float()
            predicted += ids.shape[0] * (ids.shape[1] - 2)
            for src, dst in (("a", "b"), ("b", "a")):
                own = saes[dst].decode(zz[dst]).float()
                cross = saes[dst].decode(_mapped(zz[src], maps[f"{src}->{dst}"], d[dst])).float()
                err[f"own_{dst}"] += (x[dst] - own).double().pow(2).sum().item()
                err[f"cross_{src}->{dst}"] += (x[dst] - cross).double().pow(2).sum().item()
                err[f"var_{dst}"] += (x[dst] - mean_x[dst]).double().pow(2).sum().item()
                for key, replacement in (("own", own), ("cross", cross), ("mean", mean_x[dst].expand_as(x[dst]))):
                    ce[f"{key}_{dst}"] += _next_token_loss(models[dst], paths[dst], ids, replacement)[0]
        ce = {key: value / predicted for key, value in ce.items()}
        cross = {}
        for src, dst in (("a", "b"), ("b", "a")):
            floor, clean = ce[f"mean_{dst}"], ce[f"clean_{dst}"]
            recovered = lambda x: (floor - x) / (floor - clean) if floor != clean else None
            cross[f"{src}->{dst}"] = {
                "explained_variance": 1 - err[f"cross_{src}->{dst}"] / max(err[f"var_{dst}"], 1e-12),
                "own_explained_variance": 1 - err[f"own_{dst}"] / max(err[f"var_{dst}"], 1e-12),
                "ce_clean": clean, "ce_own": ce[f"own_{dst}"], "ce_cross": ce[f"cross_{dst}"], "ce_mean": floor,
                "ce_recovered": recovered(ce[f"cross_{dst}"]), "own_ce_recovered": recovered(ce[f"own_{dst}"])}
        result["cross"] = cross

    # The learned map, and the fixed map's fit on the same held-out tokens as its baseline.
    if n >= 10:
        fit = fit_latent_map(z["a"], z["b"], aligned=aligned, steps=map_steps, l1=map_l1, seed=seed, progress=progress)
        W, fired = fit.pop("W"), fit.pop("fired")
        if maps:
            fit["fixed_map_fit"] = _fixed_fit(z["a"], z["b"], maps["a->b"], fit["train_tokens"])
        per_latent["map_nonzeros"] = (W.abs() > fit["threshold"]).sum(1).numpy()
        per_latent["map_rows_fired"] = fired.numpy()
        result["latent_map"] = fit
    result["per_latent"] = per_latent
    return result


def _fixed_fit(z_a, z_b, mapping, split: int, batch: int = 4096) -> float:
    """Explained variance of B's held-out codes by the fixed map of cross-reconstruction (identity or matching)."""
    n, d_b = z_a.shape[0], z_b.shape[1]
    mean_b = torch.zeros(d_b).index_add_(0, csr_rows(z_b, 0, split).col_indices(),
                                         csr_rows(z_b, 0, split).values().float()) / split
    error = total = 0.0
    for s in range(split, n, batch):
        e = min(s + batch, n)
        y = csr_rows(z_b, s, e).to_dense()
        error += (_mapped(csr_rows(z_a, s, e).to_dense(), mapping, d_b) - y).pow(2).sum().item()
        total += (y - mean_b).pow(2).sum().item()
    return 1 - error / max(total, 1e-12)


# --- summary ------------------------------------------------------------------------------------------------
def _pct(above: dict) -> str:
    return ", ".join(f"{above[str(t)]:.1%} above {t}" for t in reversed(THRESHOLDS))


def summary_lines(r: dict, a: str, b: str, plots: dict) -> list[str]:
    """One markdown line per activation measure of `r` (a compare_activations result); A and B named a and b."""
    lines = [f"- activations: {r['tokens']} tokens ({r['sequences']} sequences of {r['seq_len']}, position 0 left "
             f"out), {a} at {r['layers']['a']}, {b} at {r['layers']['b']}"]
    f = r["firing"]
    line = (f"- firing rate (share of tokens with code > 0): mean {f['a']['mean_rate']:.2%} in {a} (L0 "
            f"{f['a']['l0']:.1f}, {f['a']['dead']:.1%} never fire), {f['b']['mean_rate']:.2%} in {b} (L0 "
            f"{f['b']['l0']:.1f}, {f['b']['dead']:.1%} never fire)")
    if "shared" in f:
        t = f["one_sided"]
        line += (f"; by rate share f_{a} / (f_{a} + f_{b}): {f['shared']:.1%} of latents shared ({1 - t:.1f}-{t:.1f}), "
                 f"{f['a_only']:.1%} {a}'s alone (> {t}), {f['b_only']:.1%} {b}'s alone (< {1 - t:.1f}), "
                 f"{f['dead_in_both']:.1%} dead in both")
    lines.append(f"{line} [plot]({plots['firing_rate']})")
    m = r["matching"]
    if "pairs" in m:
        line = (f"- activation matching (Pearson correlation over the tokens, latents firing >= {r['min_fires']} "
                f"times: {m['live_a']} of {a}, {m['live_b']} of {b}): mean max correlation {a}->{b} "
                f"{m['mmc_a_to_b']:.3f}, {b}->{a} {m['mmc_b_to_a']:.3f}; Hungarian, {m['pairs']} pairs: mean "
                f"{m['mean_matched']:.3f}, {_pct(m['above'])}")
        if "same_index" in m:
            line += (f"; {m['same_index']:.1%} of pairs are latent i with latent i, whose own correlation is "
                     f"{m['diagonal_mean']:.3f} on average ({_pct(m['diagonal_above'])})")
        lines.append(f"{line} [plot]({plots['activation_matching']})")
    else:
        lines.append(f"- activation matching: no latent fires {r['min_fires']} times in one of them; nothing to match")
    if "cofiring" in r:
        c = r["cofiring"]
        lines.append(f"- co-firing ({c['pairs']}, {c['fired']} pairs that fire): mean Jaccard of their token sets "
                     f"{c['mean_jaccard']:.3f} (independent firing at the same rates: {c['chance']:.3f}); "
                     f"{_pct(c['above'])} [plot]({plots['cofiring']})")
    if "cross" in r:
        parts = []
        for key, (src, dst) in (("a->b", (a, b)), ("b->a", (b, a))):
            x = r["cross"][key]
            rec = lambda v: "n/a" if v is None else f"{v:.1%}"
            parts.append(f"{src}'s code decoded by {dst}'s SAE: explained variance {x['explained_variance']:.3f} "
                         f"({dst}'s own SAE {x['own_explained_variance']:.3f}), CE recovered "
                         f"{rec(x['ce_recovered'])} of the {x['ce_mean'] - x['ce_clean']:.3f} nats mean ablation costs "
                         f"({dst}'s own SAE {rec(x['own_ce_recovered'])}; CE "
                         f"{x['ce_cross']:.3f} against {dst} clean {x['ce_clean']:.3f}, own SAE {x['ce_own']:.3f}, "
                         f"mean-ablated {x['ce_mean']:.3f})")
        lines.append(f"- cross-reconstruction ({r['mapping']}): " + "; ".join(parts) + f" [plot]({plots['cross']})")
    if "latent_map" in r:
        lm = r["latent_map"]
        line = (f"- latent map {a} -> {b} (sparse linear map of codes, Adam + L1 {lm['l1']}, {lm['train_tokens']} "
                f"tokens to fit, {lm['heldout_tokens']} held out): explained variance of {b}'s held-out codes "
                f"{lm['fit']:.3f}")
        if "fixed_map_fit" in lm:
            line += f" ({r['mapping'].split(':')[0]} map: {lm['fixed_map_fit']:.3f})"
        line += f"; {lm['nonzeros_per_row']:.2f} weights per row above {lm['threshold']} ({lm['rows']} rows that fire)"
        if "diagonal" in lm:
            line += (f"; {lm['diagonal']:.1%} of |W| on the diagonal, latent i's own weight above the threshold for "
                     f"{lm['diagonal_nonzero']:.1%}")
        lines.append(f"{line} [plot]({plots['latent_map']})")
    return lines
