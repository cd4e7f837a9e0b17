"""Model stitching: an affine map from model A's residual stream into model B's, and the where-to-stitch scan.

A stitch runs A up to block `layer_a`, maps its residual stream x (width d_a) to W x + b (width d_b), puts that in
place of B's residual stream after block `layer_b` and runs the rest of B. The stitching penalty is the next-token
cross-entropy (CE) of the stitched model minus B's own CE, on held-out tokens: near 0, B's later blocks read A's
representation as well as their own (Lenc & Vedaldi 2015; Bansal et al. 2021, "Revisiting model stitching").

Two fits of the same map:
- least squares ("activation matching"): ridge regression of B's residual on A's, in closed form from sums over
  the train tokens (x, y, x x^T, x y^T in float64), so the activations never sit in memory at once;
- CE-trained (the task-loss stitch): from the least-squares map, Adam on B's next-token loss through the stitched
  model; both models stay frozen, only W and b learn.

Baselines on the same held-out tokens: B clean, A clean; B with its residual at `layer_b` replaced by its mean over
the train tokens (the floor; "CE recovered" = (CE_mean - CE_stitched) / (CE_mean - CE_B)); and the same fits from a
re-initialised, untrained A of the same config, with the same data and steps (what the fit alone buys: B reading
random features of the tokens and positions).

The residual is the output of a decoder block, as saemerge's hooks read it (hooks.py). Position 0 (the attention
sink, which harvests leave out) keeps B's own residual and is left out of the fits; the CE counts the predictions
made at positions 1..T-2 (targets 2..T-1), the ones whose residual is stitched.
"""

from __future__ import annotations

import copy
import json
import math
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import UserError
from .files import new_folder, refuse_existing
from .hooks import ResidualHook, find_blocks, run_to_layers

TRAIN_TOKENS, HELDOUT_TOKENS = 50_000, 20_000
STEPS, LR, RIDGE, BATCH_ROWS = 100, 1e-3, 1e-6, 8
DATA_HELP = "a .jsonl or .jsonl.gz file with a 'text' field"


# --- models and data ----------------------------------------------------------------------------------------
def _model(model, device: str, dtype: str) -> nn.Module:
    """A model given as a module is used as it is; a folder is loaded (offline, safetensors only) in eval mode."""
    if isinstance(model, nn.Module):
        return model.eval()
    from .evaluate import load_merged

    return load_merged(model, device=device, dtype=dtype)[0]


def _name(model: nn.Module) -> str:
    return getattr(model, "name_or_path", "") or type(model).__name__


def _tokenizer(model):
    """The tokenizer in the model's folder (a path, or a module's name_or_path); None if there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model if isinstance(model, (str, Path)) else model.name_or_path)
    except (OSError, ValueError, AttributeError):
        return None


def _check_tokenizers(a, b):
    """B's tokenizer (else A's), after checking that both give the same ids. Models built in memory, without a
    folder to read a tokenizer from, are taken as they are."""
    from .retokenize import same_tokenizer

    tok_a, tok_b = _tokenizer(a), _tokenizer(b)
    if tok_a is not None and tok_b is not None and not same_tokenizer(tok_a, tok_b):
        name = lambda m: str(m) if isinstance(m, (str, Path)) else _name(m)
        raise UserError(f"MODEL_B: the tokenizer of '{name(b)}' differs from that of '{name(a)}'; expected two "
                        "models that share one tokenizer (the same ids for the same text)")
    return tok_b if tok_b is not None else tok_a


def context(model: nn.Module) -> int:
    """The model's maximum positions (1024 if its config does not say)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    sizes = [getattr(config, k, None) for k in ("max_position_embeddings", "n_positions", "n_ctx")]
    return next((s for s in sizes if isinstance(s, int) and s > 0), 1024)


def stitch_rows(data: str | Path, tokenizer, seq_len: int, train_tokens: int = TRAIN_TOKENS,
                heldout_tokens: int = HELDOUT_TOKENS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) LongTensors of rows of `seq_len` tokens, packed (documents separated by EOS, each row
    starting with BOS if the tokenizer adds one) from ONE pass over the documents of `data` in a shuffled order:
    the first rows train, the following rows are held out, so no token is in both."""
    from .data import _bos, open_dataset
    from .recipe import DataSpec, DatasetSpec

    data = Path(data)
    if not data.is_file():
        raise UserError(f"--data: '{data}' is not a file; expected {DATA_HELP}")
    if train_tokens < 1 or heldout_tokens < 1:
        raise UserError(f"--tokens / --heldout-tokens: {train_tokens} / {heldout_tokens}; expected positive numbers")
    spec = DataSpec(datasets=[DatasetSpec(path="json", data_files=str(data))], seq_len=seq_len)
    documents = open_dataset(spec.datasets[0], "--data", seed, spec.shuffle_buffer)  # one pass: no set_epoch loop
    bos = _bos(spec, tokenizer)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    body = seq_len - len(bos)
    n_train, n_held = math.ceil(train_tokens / seq_len), math.ceil(heldout_tokens / seq_len)
    need = (n_train + n_held) * body
    ids: list[int] = []
    for doc in documents:
        if doc["text"]:
            ids += tokenizer(doc["text"], add_special_tokens=False)["input_ids"] + eos
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise UserError(f"--data: '{data}' holds {len(ids)} tokens; expected at least {need} for {n_train} train and "
                        f"{n_held} held-out rows of {seq_len} (lower --tokens or --heldout-tokens)")
    rows = torch.tensor([bos + ids[i * body:(i + 1) * body] for i in range(n_train + n_held)])
    return rows[:n_train], rows[n_train:]


def _layers(model: nn.Module, layers, arg: str) -> list[int]:
    """Block indices, all blocks when None; an index out of range is a UserError naming `arg`."""
    n = len(find_blocks(model)[1])
    layers = list(range(n)) if layers is None else [layers] if isinstance(layers, int) else list(layers)
    for layer in layers:
        if not isinstance(layer, int) or not 0 <= layer < n:
            raise UserError(f"{arg}: block {layer!r} is out of range; expected block indices 0..{n - 1} "
                            f"('{_name(model)}' has {n} blocks)")
    if not layers:
        raise UserError(f"{arg}: no blocks; expected at least one block index")
    return layers


def _chunks(rows: torch.Tensor, size: int = BATCH_ROWS):
    return rows.split(size)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _frozen(*models: nn.Module):
    """No gradients into the models' weights (W and b still get theirs, through B); restored afterwards."""
    flags = [(p, p.requires_grad) for m in models for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def random_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """A freshly initialised, untrained model of the same config, dtype and device (the control of the stitch)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
    fresh.name_or_path = f"random init of {_name(model)}"
    return fresh.to(_device(model)).eval()


# --- the stitch ---------------------------------------------------------------------------------------------
def _token_ce(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed CE of the predictions at positions 1..T-2 (their residual is the stitched one), and their count."""
    targets = ids[:, 2:]
    return F.cross_entropy(logits[:, 1:-1].flatten(0, 1).float(), targets.flatten(), reduction="sum"), targets.numel()


def _spliced_logits(model_b: nn.Module, layer_b: int, ids: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """B's logits with its residual after block `layer_b` replaced at positions >= 1 by `value` ([rows, T-1, d_b],
    or one vector [d_b] for every position); position 0 stays B's own."""
    def splice(hidden):
        rest = value.to(hidden.dtype).expand(hidden.shape[0], hidden.shape[1] - 1, hidden.shape[2])
        return torch.cat([hidden[:, :1], rest], dim=1)

    with ResidualHook(model_b, layer_b, "replace", sae=splice):
        return model_b(input_ids=ids, use_cache=False).logits


def _stitched_logits(model_a, model_b, layer_a, layer_b, ids, stitch: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        x = run_to_layers(model_a, [layer_a], ids.to(_device(model_a)))[0][:, 1:]
    return _spliced_logits(model_b, layer_b, ids, stitch(x.to(_device(model_b)).float()))


@torch.no_grad()
def _heldout_ce(model_b: nn.Module, rows: torch.Tensor, logits_of=None) -> float:
    """Mean held-out CE of B (or of `logits_of(ids)`, a spliced B), nats per token."""
    total, count = 0.0, 0
    for ids in _chunks(rows):
        ids = ids.to(_device(model_b))
        loss, n = _token_ce(logits_of(ids) if logits_of else model_b(input_ids=ids, use_cache=False).logits, ids)
        total, count = total + loss.item(), count + n
    return total / count


@torch.no_grad()
def _moments(model_a, model_b, layers_a, layers_b, rows) -> dict:
    """Sums over the train tokens at positions >= 1, in float64: n, x and x x^T per A layer, y per B layer,
    x y^T per pair (d_a * d_b * 8 bytes each)."""
    m = {"n": 0, "x": {}, "xx": {}, "y": {}, "xy": {}}
    for ids in _chunks(rows):
        xs = run_to_layers(model_a, layers_a, ids.to(_device(model_a)))
        ys = run_to_layers(model_b, layers_b, ids.to(_device(model_b)))
        xs = {la: x[:, 1:].flatten(0, 1).double().cpu() for la, x in zip(layers_a, xs)}
        ys = {lb: y[:, 1:].flatten(0, 1).double().cpu() for lb, y in zip(layers_b, ys)}
        m["n"] += len(next(iter(xs.values())))
        add = lambda key, k, v: m[key].__setitem__(k, m[key][k] + v if k in m[key] else v)
        for la, x in xs.items():
            add("x", la, x.sum(0))
            add("xx", la, x.T @ x)
            for lb, y in ys.items():
                add("xy", (la, lb), x.T @ y)
        for lb, y in ys.items():
            add("y", lb, y.sum(0))
    return m


@torch.no_grad()
def _means(model: nn.Module, layers: list[int], rows: torch.Tensor) -> dict[int, torch.Tensor]:
    """The model's mean residual after each block over the train tokens at positions >= 1 (the floor's value)."""
    sums, n = {}, 0
    for ids in _chunks(rows):
        for layer, h in zip(layers, run_to_layers(model, layers, ids.to(_device(model)))):
            sums[layer] = sums.get(layer, 0) + h[:, 1:].double().sum((0, 1))
        n += ids[:, 1:].numel()
    return {layer: (s / n).float().to(_device(model)) for layer, s in sums.items()}


def least_squares_stitch(m: dict, layer_a: int, layer_b: int, ridge: float = RIDGE) -> nn.Linear:
    """The affine map W x + b minimising the squared error to B's residual over the train tokens, with a ridge of
    `ridge` times the mean variance of A's residual (it only matters for directions A hardly uses)."""
    n = m["n"]
    mean_x, mean_y = m["x"][layer_a] / n, m["y"][layer_b] / n
    cov_xx = m["xx"][layer_a] / n - torch.outer(mean_x, mean_x)
    cov_xy = m["xy"][(layer_a, layer_b)] / n - torch.outer(mean_x, mean_y)
    d_a, d_b = cov_xy.shape
    lam = ridge * cov_xx.trace() / d_a
    w = torch.linalg.solve(cov_xx + lam * torch.eye(d_a, dtype=cov_xx.dtype), cov_xy)  # [d_a, d_b]
    stitch = nn.Linear(d_a, d_b)
    with torch.no_grad():
        stitch.weight.copy_(w.T)
        stitch.bias.copy_(mean_y - mean_x @ w)
    return stitch


def train_stitch(stitch: nn.Linear, model_a, model_b, layer_a: int, layer_b: int, rows: torch.Tensor,
                 steps: int = STEPS, lr: float = LR, batch_rows: int = BATCH_ROWS, seed: int = 0,
                 desc: str | None = None) -> list[float]:
    """Adam on B's next-token loss through the stitched model (cosine decay of the learning rate to 10%), only
    W and b learning; returns the training loss of each step (nats per token)."""
    device = _device(model_b)
    stitch.to(device)
    optimizer = torch.optim.Adam(stitch.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * s / max(steps, 1))))
    order = torch.Generator().manual_seed(seed)
    losses = []
    with _frozen(model_a, model_b):
        for _ in tqdm(range(steps), desc=desc, disable=desc is None, leave=False, unit="step"):
            ids = rows[torch.randint(len(rows), (batch_rows,), generator=order)].to(device)
            loss, n = _token_ce(_stitched_logits(model_a, model_b, layer_a, layer_b, ids, stitch), ids)
            optimizer.zero_grad()
            (loss / n).backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item() / n)
    return losses


def _stitch_ce(model_a, model_b, layer_a, layer_b, heldout, stitch) -> float:
    return _heldout_ce(model_b, heldout, lambda ids: _stitched_logits(model_a, model_b, layer_a, layer_b, ids, stitch))


def _fits(model_a, model_b, layers_a, layers_b, train, heldout, steps, lr, ridge, batch_rows, seed, label,
          bar) -> dict:
    """For every pair: the least-squares map, its held-out CE, then the CE-trained map and its held-out CE."""
    moments = _moments(model_a, model_b, layers_a, layers_b, train)
    out = {}
    for la in layers_a:
        for lb in layers_b:
            bar.set_postfix_str(f"{label} {la}->{lb}")
            stitch = least_squares_stitch(moments, la, lb, ridge).to(_device(model_b))
            fit = {"ce_lstsq": _stitch_ce(model_a, model_b, la, lb, heldout, stitch), "lstsq": stitch}
            if steps:
                trained = copy.deepcopy(stitch)  # starts from the least-squares map
                fit["train_loss"] = train_stitch(trained, model_a, model_b, la, lb, train, steps, lr, batch_rows, seed)
                fit["ce_trained"] = _stitch_ce(model_a, model_b, la, lb, heldout, trained)
                fit["trained"] = trained
            out[(la, lb)] = fit
            bar.update()
    return out


def _loss_summary(losses: list[float]) -> dict:
    k = max(1, min(10, len(losses) // 5))
    return {"first": sum(losses[:k]) / k, "last": sum(losses[-k:]) / k, "steps": len(losses), "averaged_over": k,
            "curve": losses[::max(1, len(losses) // 50)]}


def stitch_scan(model_a, model_b, layers_a=None, layers_b=None, batches=None, *, steps: int = STEPS,
                lr: float = LR, ridge: float = RIDGE, batch_rows: int = BATCH_ROWS, controls: bool = True,
                seed: int = 0, train_tokens: int = TRAIN_TOKENS, heldout_tokens: int = HELDOUT_TOKENS,
                seq_len: int | None = None, device: str = "cpu", dtype: str = "float32",
                output: str | Path | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """The stitching penalty for every pair (layer_a in `layers_a`, layer_b in `layers_b`; None: all blocks).

    `model_a`, `model_b`: models, or model folders (loaded in `dtype` on `device`). `batches`: a data file
    (.jsonl/.jsonl.gz, "text"), split by `stitch_rows` into `train_tokens` and `heldout_tokens` (rows of
    `seq_len`, default the models' context up to 1024), or a pair (train, held-out) of LongTensors
    [rows, seq_len]. `steps` of CE training per pair (0: least squares only); `controls`: also the mean-ablation
    floor and the random-A stitch. With `output`, writes stitch.json, stitch.md and stitch_heatmap.png into that
    new folder. Returns a dict: "ce" (baselines), "penalty" and "ce_recovered" (matrices [len(layers_a)]
    [len(layers_b)] per fit), "pairs" (per pair: all numbers, and the maps as nn.Linear under "maps")."""
    start = time.perf_counter()
    output = None if output is None else Path(output)
    refuse_existing(output, overwrite)
    for arg, value, ok, expected in [("--steps", steps, steps >= 0, "0 or more"),
                                     ("--batch-rows", batch_rows, batch_rows >= 1, "1 or more"),
                                     ("--lr", lr, lr > 0, "a positive number"), ("ridge", ridge, ridge >= 0, ">= 0")]:
        if not ok:
            raise UserError(f"{arg}: {value}; expected {expected}")
    if batches is None:
        raise UserError(f"--data: missing; expected {DATA_HELP}, or (train, held-out) token rows")
    if isinstance(batches, (str, Path)) and not Path(batches).is_file():
        raise UserError(f"--data: '{batches}' is not a file; expected {DATA_HELP}")
    tokenizer = _check_tokenizers(model_a, model_b)  # before loading: folders' tokenizers are cheap to read
    model_a, model_b = _model(model_a, device, dtype), _model(model_b, device, dtype)
    layers_a, layers_b = _layers(model_a, layers_a, "--layers-a"), _layers(model_b, layers_b, "--layers-b")
    if isinstance(batches, (str, Path)):
        if tokenizer is None:
            raise UserError("--data: neither model has a tokenizer folder; expected models loaded from folders, or "
                            "(train, held-out) token tensors instead of a file")
        longest = min(context(model_a), context(model_b))
        if seq_len is not None and not 3 <= seq_len <= longest:
            raise UserError(f"--seq-len: {seq_len}; expected 3 to {longest} (the models' context)")
        seq_len = seq_len or min(longest, 1024)
        train, heldout = stitch_rows(batches, tokenizer, seq_len, train_tokens, heldout_tokens, seed)
        split = (f"one pass over '{batches}' in a shuffled document order (seed {seed}), packed into rows of "
                 f"{seq_len}: the first {len(train)} rows train, the next {len(heldout)} are held out")
    else:
        train, heldout = batches
        train, heldout = (torch.cat(list(t)) if isinstance(t, (list, tuple)) else t for t in (train, heldout))
        split = "train and held-out rows given by the caller"
    pairs = len(layers_a) * len(layers_b)
    bar = tqdm(total=pairs * (2 if controls else 1), desc="stitching", unit="pair", disable=not progress)
    ce_b = _heldout_ce(model_b, heldout)
    ce_a = _heldout_ce(model_a, heldout)
    fits = _fits(model_a, model_b, layers_a, layers_b, train, heldout, steps, lr, ridge, batch_rows, seed, "A", bar)
    ce_mean, random_fits = {}, {}
    if controls:
        means = _means(model_b, layers_b, train)
        for lb, mean in means.items():
            ce_mean[lb] = _heldout_ce(model_b, heldout, partial(_spliced_logits, model_b, lb, value=mean))
        random_a = random_like(model_a, seed)
        random_fits = _fits(random_a, model_b, layers_a, layers_b, train, heldout, steps, lr, ridge, batch_rows,
                            seed, "random A", bar)
        del random_a
    bar.close()

    kinds = ["lstsq"] + (["trained"] if steps else [])
    results = []
    for (la, lb), fit in fits.items():
        ce = {"b": ce_b, "a": ce_a, **{k: fit[f"ce_{k}"] for k in kinds}}
        if controls:
            ce |= {"mean": ce_mean[lb], **{f"random_{k}": random_fits[(la, lb)][f"ce_{k}"] for k in kinds}}
        pair = {"layer_a": la, "layer_b": lb, "d_a": fit["lstsq"].in_features, "d_b": fit["lstsq"].out_features,
                "ce": ce, "penalty": {k: v - ce_b for k, v in ce.items() if k not in ("a", "b")}}
        if controls:
            floor = ce_mean[lb] - ce_b
            pair["ce_recovered"] = {k: (ce_mean[lb] - v) / floor if floor > 0 else None
                                    for k, v in ce.items() if k not in ("a", "b", "mean")}
        if steps:
            pair["train_loss"] = _loss_summary(fit["train_loss"])
            if controls:
                pair["random_train_loss"] = _loss_summary(random_fits[(la, lb)]["train_loss"])
        pair["maps"] = {k: fit[k] for k in kinds} | {f"random_{k}": random_fits[(la, lb)][k] for k in kinds
                                                      if controls}
        results.append(pair)

    def matrix(section: str, kind: str):
        by_pair = {(p["layer_a"], p["layer_b"]): p[section][kind] for p in results}
        return [[by_pair[(la, lb)] for lb in layers_b] for la in layers_a]

    report = {
        "model_a": _name(model_a), "model_b": _name(model_b), "layers_a": layers_a, "layers_b": layers_b,
        "data": {"source": str(batches) if isinstance(batches, (str, Path)) else None, "split": split,
                 "train_rows": len(train), "heldout_rows": len(heldout), "seq_len": train.shape[1],
                 "train_tokens": train[:, 1:].numel(), "heldout_predictions": heldout[:, 2:].numel()},
        "settings": {"steps": steps, "lr": lr, "ridge": ridge, "batch_rows": batch_rows, "seed": seed,
                     "controls": controls, "dtype": str(next(model_b.parameters()).dtype)},
        "ce": {"b": ce_b, "a": ce_a, **({"mean": {str(lb): ce_mean[lb] for lb in layers_b}} if controls else {})},
        "penalty": {k: matrix("penalty", k) for k in results[0]["penalty"]},
        "ce_recovered": {k: matrix("ce_recovered", k) for k in results[0].get("ce_recovered", {})},
        "pairs": results,
    }
    report["seconds"] = round(time.perf_counter() - start, 1)
    if output is not None:
        _write(report, output, overwrite)
    return report


def fit_stitch(model_a, model_b, layer_a: int, layer_b: int, train_batches, heldout_batches=None, **options) -> dict:
    """One stitch, A after block `layer_a` -> B after block `layer_b`: the numbers of one pair of `stitch_scan`
    (ce, penalty, ce_recovered, train_loss, maps), with its "data" and "settings". `train_batches`: a LongTensor
    [rows, seq_len] (then `heldout_batches` too), or a data file that both are split from. `options`: those of
    `stitch_scan` (steps, lr, ridge, batch_rows, controls, seed, ...)."""
    if isinstance(train_batches, (str, Path)):
        batches = train_batches
    elif heldout_batches is None:
        raise UserError("heldout_batches: missing; expected held-out token rows (or a data file as train_batches)")
    else:
        batches = (train_batches, heldout_batches)
    report = stitch_scan(model_a, model_b, [layer_a], [layer_b], batches, **options)
    return {**report["pairs"][0], **{k: report[k] for k in ("model_a", "model_b", "data", "settings", "seconds")}}


# --- output -------------------------------------------------------------------------------------------------
LABELS = {"lstsq": "least squares", "trained": "CE-trained", "mean": "mean of B (floor)",
          "random_lstsq": "random A, least squares", "random_trained": "random A, CE-trained"}


def summary(report: dict) -> str:
    """The markdown summary: the baselines, then one table row per layer pair."""
    ce, s, d = report["ce"], report["settings"], report["data"]
    kinds = [k for k in LABELS if k in report["penalty"]]
    lines = [f"# Stitching {report['model_a']} (A) -> {report['model_b']} (B)", "",
             f"- held-out CE, nats per token: B {ce['b']:.4f}, A {ce['a']:.4f}"
             + ("" if "mean" not in ce else ", B with its residual replaced by its mean: "
                + ", ".join(f"block {lb} {v:.4f}" for lb, v in ce["mean"].items())),
             f"- data: {d['split']}; {d['train_tokens']} train tokens, {d['heldout_predictions']} held-out predictions",
             f"- fits: least squares (ridge {s['ridge']:g}); " + (
                 f"CE-trained: {s['steps']} Adam steps of {s['batch_rows']} rows, lr {s['lr']:g}" if s["steps"]
                 else "no CE training"),
             ("- penalty = CE of the stitched B - CE of B clean (0: nothing lost); recovered = (CE_mean - CE_stitched) "
              "/ (CE_mean - CE_B) (1: as good as B, 0: as bad as B's mean)"), ""]
    header = ["A block", "B block"] + [f"penalty, {LABELS[k]}" for k in kinds]
    header += [f"recovered, {LABELS[k]}" for k in report["ce_recovered"] if k in ("lstsq", "trained")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in report["pairs"]:
        cells = [str(p["layer_a"]), str(p["layer_b"])] + [f"{p['penalty'][k]:+.4f}" for k in kinds]
        cells += [("-" if p["ce_recovered"][k] is None else f"{p['ce_recovered'][k]:.3f}")
                  for k in report["ce_recovered"] if k in ("lstsq", "trained")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_heatmap(report: dict, path: str | Path) -> None:
    """Penalty heatmaps (rows A's blocks, columns B's; one panel per fit of the real A), numbers in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = [k for k in ("lstsq", "trained") if k in report["penalty"]]
    mats = [np.array(report["penalty"][k]) for k in kinds]
    vmin, vmax = min(m.min() for m in mats), max(m.max() for m in mats)
    la, lb = report["layers_a"], report["layers_b"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(1.2 + 0.9 * len(lb) * len(kinds) + 1.2, 1.6 + 0.7 * len(la)),
                             squeeze=False, constrained_layout=True)
    for ax, kind, m in zip(axes[0], kinds, mats):
        image = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=vmax)
        for i in range(len(la)):
            for j in range(len(lb)):
                dark = (m[i, j] - vmin) < 0.5 * (vmax - vmin)
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
        ax.set_xticks(range(len(lb)), lb)
        ax.set_yticks(range(len(la)), la)
        ax.set_xlabel(f"B block ({Path(report['model_b']).name})")
        if ax is axes[0][0]:
            ax.set_ylabel(f"A block ({Path(report['model_a']).name})")
        ax.set_title(LABELS[kind], fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), label="stitching penalty, nats per token")
    fig.suptitle(f"{Path(report['model_a']).name} -> {Path(report['model_b']).name}: held-out CE of the stitched "
                 f"model - B's own ({report['ce']['b']:.3f})", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def to_json(report: dict) -> dict:
    """The report without the maps (nn.Linear), as written to stitch.json."""
    return {**report, "pairs": [{k: v for k, v in p.items() if k != "maps"} for p in report["pairs"]]}


def _write(report: dict, output: Path, overwrite: bool) -> None:
    """stitch.json, stitch.md and stitch_heatmap.png into a hidden folder beside `output`, renamed into place."""
    with new_folder(output, overwrite) as tmp:
        (tmp / "stitch.json").write_text(json.dumps(to_json(report), indent=2, allow_nan=False))
        (tmp / "stitch.md").write_text(summary(report))
        plot_heatmap(report, tmp / "stitch_heatmap.png")
