#!/usr/bin/env python3
"""SAE training throughput: saemerge's TopK trainer against EleutherAI sparsify's, and joint against single SAEs.

    python eval/sae_throughput.py --model eval/zoo/prose --layer 1 --latents 1024 --k 32 --batch 16 --steps 24
    python eval/sae_throughput.py --model models/gemma-3-270m-hf --layer 6 --latents 2048 --batch 4 --seq-len 64 \\
        --steps 8 --repeats 1 [--sparsify-truncated]
    python eval/sae_throughput.py --model eval/zoo/prose --pair eval/zoo/code --layer 1 --latents 1024 --steps 24

Without --pair: in one process, same model, layer, latents, k, batch and token rows, (a) our single-source TopK
SAE (the whole `train_saes` call: its harvest, with the forward stopped at the layer, on-the-fly tokenizing, data
init, resampling every --resample-every steps, one held-back batch for its metrics) and (b) sparsify's
`Trainer(cfg, dataset, model).fit()` (SAE init, the full model forward with a hook on `layers.i` = our `layer: i`,
its final save); --sparsify-truncated gives sparsify the model cut after the layer with no LM head (our forward
work: the SAE training is then what differs). Model loading is timed by neither. sparsify reads, pre-tokenized,
exactly the rows of `saemerge.data.token_batches(recipe.data, tokenizer, batch, seed)` our trainer trains on.
Tokens/s = steps * batch * seq_len / seconds for both (our harvest drops position 0, the attention sink; sparsify
excludes token ids only: BOS when the tokenizer adds it (Gemma), otherwise (zoo GPT-2) it trains on position 0).
Our trainer harvests in blocks of `train.shuffle_batches` (8) and shuffles tokens within a block: with --steps a
multiple of it, it trains on exactly these rows' tokens (its held-back batches come unshuffled after them).

sparsify keeps its defaults: signum (sign SGD, schedule-free wrapper, momentum 0.95), lr 5e-3 / sqrt(latents /
2^14), no lr warm-up, no AuxK, b_dec = the first batch's mean, random encoder with the decoder its normalised
transpose, inputs not scaled. Ours: the recipe defaults (Adam, lr 1e-3, cosine decay to 10%, init from data,
inputs divided by act_scale), l1 = l2 = align = cross = 0. `explained_variance` scores both on the same held-out
activations (fresh rows after every row either trainer read, position 0 dropped); sparsify's SAE is the one it
saved (its schedule-free averaged weights). An untimed 2-step run of each comes first; repeats alternate the order
(AB, BA, ...); medians reported, with the cpu seconds other processes took meanwhile (/proc/stat): the machine may
be shared, and a repeat where they took much was slowed.

With --pair OTHER (sharing the tokenizer): joint two-source training (align 1.0) against two single-source
trainings one after the other, on the same rows. Appends to eval/results/sae_throughput.json.
"""

from __future__ import annotations

import argparse
import copy
import io
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from importlib.metadata import version
from pathlib import Path

import torch

from saemerge.data import token_batches
from saemerge.hooks import find_blocks, resolve_layer, run_to_layers
from saemerge.harvest import activation_batches
from saemerge.recipe import DataSpec, LatentSpec, SourceSpec, TrainSpec
from saemerge.sources import load_source, load_tokenizer
from saemerge.train import train_saes

REPO = Path(__file__).resolve().parent.parent
DATA = [{"path": "json", "data_files": str(REPO / f"eval/data/{d}/train.jsonl.gz"), "weight": 0.5}
        for d in ("prose", "code")]


def run_ours(args, align: float, sources: dict, paths: dict, tokenizer) -> tuple[tuple[float, float, float], dict]:
    """saemerge's trainer on the sources given (one: a lone SAE; two: an aligned pair), harvesting as it trains."""
    latent = LatentSpec(size=args.latents, activation="topk", k=args.k, l1=0.0, l2=0.0, align=align, cross=0.0,
                        init="data")
    train = TrainSpec(batch_tokens=args.batch * args.seq_len, seed=args.seed, device="cpu",
                      resample_every=args.resample_every, checkpoint_every=0)
    data = DataSpec(datasets=DATA, seq_len=args.seq_len)
    stream = lambda start: activation_batches(sources, paths, token_batches(data, tokenizer, args.batch, args.seed),
                                              start, train.shuffle_batches, args.seed)
    return timed(lambda: train_saes(stream, latent, train, args.steps, progress=False)[0][0])


@torch.no_grad()
def explained_variance(reconstruct, x: torch.Tensor, chunk: int = 2048) -> float:
    """1 - sum |x - recon|^2 / sum |x - mean x|^2 over held-out activations [tokens, d], for any SAE."""
    error = sum((x[i:i + chunk] - reconstruct(x[i:i + chunk])).pow(2).sum() for i in range(0, len(x), chunk))
    return 1 - (error / (x - x.mean(0)).pow(2).sum()).item()


@torch.no_grad()
def held_out(model, path: str, batches: list[torch.Tensor]) -> torch.Tensor:
    hidden = [run_to_layers(model, [path], ids)[0][:, 1:] for ids in batches]  # position 0 dropped, as we train
    return torch.cat([h.reshape(-1, h.shape[-1]).float() for h in hidden])


def busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (Linux /proc/stat), to see what other jobs took."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def timed(fn, *args):
    """(wall seconds, our cpu seconds, cpu seconds other processes took meanwhile), fn's result. The machine
    is shared: a repeat during which others took much cpu is slowed down."""
    wall, cpu, busy = time.perf_counter(), time.process_time(), busy_seconds()
    result = fn(*args)
    cpu = time.process_time() - cpu
    return (time.perf_counter() - wall, cpu, max(0.0, busy_seconds() - busy - cpu)), result


def truncated(model, layer: int):
    """A copy of `model` that stops after block `layer` and whose LM head is the identity: the forward work our
    harvest does, so that sparsify's time is its SAE training plus the same forward (--sparsify-truncated)."""
    model = copy.deepcopy(model)
    _, blocks = find_blocks(model)
    del blocks[layer + 1:]
    model.config.get_text_config().num_hidden_layers = layer + 1
    model.set_output_embeddings(torch.nn.Identity())
    return model


def run_sparsify(args, model, path: str, rows: list[list[int]], exclude: list[int]):
    from datasets import Dataset
    from sparsify import SparseCoder, Trainer
    from sparsify.config import SparseCoderConfig, TrainConfig

    dataset = Dataset.from_dict({"input_ids": rows}).with_format("torch")
    precision = torch.get_float32_matmul_precision()  # fit() sets "high"; put it back for our runs
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(SparseCoderConfig(activation="topk", num_latents=args.latents, k=args.k),
                          batch_size=args.batch, layers=[args.layer], exclude_tokens=exclude, log_to_wandb=False,
                          save_dir=tmp)
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            seconds, _ = timed(lambda: Trainer(cfg, dataset, model).fit())
        torch.set_float32_matmul_precision(precision)
        hook = cfg.hookpoints[0]
        assert model.base_model.get_submodule(hook) is model.get_submodule(path), (hook, path)
        coder = SparseCoder.load_from_disk(Path(tmp) / "unnamed" / hook)
    return seconds, coder


def machine() -> dict:
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"), "saemerge_edited": bool(git("status", "--short", "saemerge")),
            "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": version("transformers"), "sparsify": version("eai-sparsify"),
            "load_average_at_end": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="eval/zoo/prose", help="causal LM folder (safetensors)")
    parser.add_argument("--pair", default=None, help="second model sharing the tokenizer: joint vs two singles")
    parser.add_argument("--layer", type=int, default=1, help="block index (sparsify: layers.i)")
    parser.add_argument("--latents", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24, help="a multiple of train.shuffle_batches (8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out batches for explained variance")
    parser.add_argument("--resample-every", type=int, default=25, help="ours: the recipe default (0: never)")
    parser.add_argument("--sparsify-truncated", action="store_true",
                        help="sparsify on the model cut after the layer, LM head dropped (SAE training compared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(REPO / "eval/results/sae_throughput.json"))
    args = parser.parse_args()

    models = {"a": args.model} | ({"b": args.pair} if args.pair else {})
    specs = {n: SourceSpec(name=n, model=m, layer=args.layer) for n, m in models.items()}
    sources = {n: load_source(spec, "cpu") for n, spec in specs.items()}
    tokenizer = load_tokenizer(specs["a"])
    paths = {n: [resolve_layer(model, args.layer)] for n, model in sources.items()}

    # The rows: training batches first, then past every batch our trainer reads (data init, its held-back batch,
    # rounded up to a block of train.shuffle_batches where the trainer harvests and shuffles by blocks), held-out.
    block = TrainSpec().shuffle_batches
    n_init = math.ceil(args.latents / (args.batch * (args.seq_len - 1)))
    skip = math.ceil((args.steps + n_init + 1) / block) * block
    stream = token_batches(DataSpec(datasets=DATA, seq_len=args.seq_len), tokenizer, args.batch, args.seed)
    batches = list(itertools.islice(stream, skip + args.eval_batches))
    rows = torch.cat(batches[:args.steps]).tolist()
    acts = {n: held_out(model, paths[n][0], batches[-args.eval_batches:]) for n, model in sources.items()}
    tokens = args.steps * args.batch * args.seq_len

    theirs = truncated(sources["a"], args.layer) if args.sparsify_truncated else sources["a"]
    bos = tokenizer.bos_token_id  # sparsify excludes token ids only: BOS when every row starts with it
    exclude = [bos] if bos is not None and all(r[0] == bos for r in rows) else []
    warm = argparse.Namespace(**{**vars(args), "steps": 2})  # untimed: first-call costs (kernels, lazy imports)
    run_ours(warm, 1.0 if args.pair else 0.0, sources, paths, tokenizer)
    if not args.pair:
        run_sparsify(warm, theirs, paths["a"][0], rows[:2 * args.batch], exclude)
    seconds, cpu, others, ev = {}, {}, {}, {}

    def record(name, times, value):
        for store, t in zip((seconds, cpu, others), times):
            store.setdefault(name, []).append(t)
        ev.setdefault(name, []).append(value)

    for repeat in range(args.repeats):
        if not args.pair:
            runs = {"saemerge": lambda: run_ours(args, 0.0, {"a": sources["a"]}, paths, tokenizer),
                    "sparsify": lambda: run_sparsify(args, theirs, paths["a"][0], rows, exclude)}
            for name in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
                times, sae = runs[name]()
                fn = sae["a"] if name == "saemerge" else lambda x, c=sae: c.decode(*c.encode(x)[:2])
                record(name, times, explained_variance(fn, acts["a"]))
        else:
            for name in (["joint", "singles"] if repeat % 2 == 0 else ["singles", "joint"]):
                if name == "joint":
                    times, saes = run_ours(args, 1.0, sources, paths, tokenizer)
                    record(name, times, {n: explained_variance(saes[n], acts[n]) for n in sources})
                else:  # one after the other, on the same rows
                    runs = {n: run_ours(args, 0.0, {n: sources[n]}, {n: paths[n]}, tokenizer) for n in sources}
                    record(name, [sum(t[i] for t, _ in runs.values()) for i in range(3)],
                           {n: explained_variance(sae[n], acts[n]) for n, (_, sae) in runs.items()})
                    seconds.setdefault("singles_each", []).append([t[0] for t, _ in runs.values()])
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{k} {seconds[k][-1]:.1f} s (cpu {cpu[k][-1]:.1f} s, other jobs {others[k][-1]:.1f} cpu-s)"
            for k in cpu), flush=True)

    names = list(cpu)
    median = {k: statistics.median(seconds[k]) for k in names}
    tps = {k: tokens / median[k] for k in names}
    best = {k: tokens / min(seconds[k]) for k in names}  # the least disturbed repeat
    ev_median = {k: statistics.median(ev[k]) if not isinstance(ev[k][0], dict)
                 else {n: statistics.median(e[n] for e in ev[k]) for n in sources} for k in names}
    first, second = names if not args.pair else ("joint", "singles")
    result = {
        "kind": "pair" if args.pair else "vs_sparsify", "args": vars(args), "models": models,
        "layer_paths": {n: p[0] for n, p in paths.items()}, "train_tokens": tokens,
        "held_out_tokens": len(acts["a"]),
        "our_shuffle_batches": block, "seconds": seconds, "cpu_seconds": cpu, "other_jobs_cpu_seconds": others,
        "seconds_median": median, "tokens_per_second_best": best,
        "tokens_per_second_median": tps, f"ratio_{first}_over_{second}": tps[first] / tps[second],
        "explained_variance": ev, "explained_variance_median": ev_median, "machine": machine(),
    }
    if not args.pair:
        result["sparsify_excluded_tokens"] = exclude
    output = Path(args.output)
    records = json.loads(output.read_text()) if output.exists() else []
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(records + [result], indent=2) + "\n")

    print(f"\n{args.model}{' + ' + args.pair if args.pair else ''}, layer {args.layer}, {args.latents} latents, "
          f"k {args.k}, {args.steps} steps x {args.batch} x {args.seq_len} = {tokens} tokens, {args.repeats} repeats")
    print(f"{'':10} {'median s':>9} {'tokens/s':>9} {'best':>7} {'others':>7}  explained variance (held-out "
          f"{len(acts['a'])} tokens)\n(best: tokens/s of the fastest repeat; others: cpu-s other jobs took meanwhile, median)")
    for k in names:
        e = ev_median[k]
        text = f"{e:.4f}" if not isinstance(e, dict) else "  ".join(f"{models[n]} {v:.4f}" for n, v in e.items())
        print(f"{k:10} {median[k]:9.2f} {tps[k]:9.0f} {best[k]:7.0f} {statistics.median(others[k]):7.1f}  {text}")
    print(f"ratio {first}/{second} tokens/s: {tps[first] / tps[second]:.2f} (best: {best[first] / best[second]:.2f})")


if __name__ == "__main__":
    main()
