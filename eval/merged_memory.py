#!/usr/bin/env python3
"""Peak memory of one merged forward against the sum of the sources' own peaks, on the same B x T tokens.

    python eval/merged_memory.py --batch 16 --seq 128                # the quickstart merge (its context is 128)
    python eval/merged_memory.py --model out/gemma3-270m-general-x-code --dtype float32     # 16 x 512
    python eval/merged_memory.py --model out/gemma3-270m-general-x-code --heads target --repeats 3

Goal: merged peak <= 1.2x the sum of the sources' own peaks.

One forward under torch.inference_mode: each source alone as the plain HF model it is
(`model.sources[name](input_ids=..., attention_mask=...)`, full logits, as a user would get them), then the
merged model; `--repeats` rounds, the maximum of each reported. Tokens: the first T tokens of test documents,
alternately prose and code (documents too short are joined, EOS between, and cut into T-token pieces, when too
few are long enough). On CPU the peak is the process's: the kernel's high-water mark is reset before each
forward (write "5" to /proc/self/clear_refs, after gc.collect and glibc's malloc_trim(0), so that freed heap
is not reused unseen), and peak = VmHWM after - VmRSS before; VmRSS before (the loaded weights and whatever
else the process holds) is recorded too. On a GPU: torch.cuda max_memory_allocated after
reset_peak_memory_stats, minus memory_allocated before. Sizes in GiB; a float32 [B, T, V] logits tensor is given
for scale. Appends to eval/results/merged_memory.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import gzip
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import saemerge  # noqa: F401  (registers the merged model class)

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
try:  # glibc keeps freed heap resident, which later forwards reuse unseen: hand it back before each measurement
    TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except OSError:
    TRIM = None


def token_batch(tokenizer, batch: int, seq: int) -> torch.Tensor:
    """[batch, seq]: alternately prose and code; per domain the first seq tokens of test documents at least that
    long, then (if too few are) the shorter ones joined with EOS between and cut into seq-token pieces, cycled if
    still too few."""
    rows = {}
    for domain, need in (("prose", (batch + 1) // 2), ("code", batch // 2)):
        with gzip.open(REPO / f"eval/data/{domain}/test.jsonl.gz", "rt") as f:
            ids = [tokenizer(json.loads(line)["text"])["input_ids"] for line in f]
        long = [x[:seq] for x in ids if len(x) >= seq]
        joined = [t for x in ids if len(x) < seq for t in [*x, tokenizer.eos_token_id]]
        pieces = [joined[i:i + seq] for i in range(0, len(joined) - seq + 1, seq)]
        if need and not long + pieces:
            sys.exit(f"eval/data/{domain}/test.jsonl.gz holds fewer than {seq} tokens")
        rows[domain] = list(itertools.islice(itertools.cycle(long + pieces), need))
    return torch.tensor([rows[("prose", "code")[i % 2]][i // 2] for i in range(batch)])


def status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) * 1024


def measure(forward, device: torch.device) -> tuple[float, float]:
    """(peak of one call of `forward` above what was held before it, what was held before it), in GiB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        forward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        if TRIM is not None:
            TRIM(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = status("VmRSS")
        forward()  # its output is dropped on return
        peak = status("VmHWM")
    gc.collect()
    return (peak - before) / GIB, before / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="out/quickstart", help="merged model folder")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (capped to the sources' context)")
    parser.add_argument("--heads", choices=["target", "mean", "router"], help="override config.heads (default: saved)")
    parser.add_argument("--dtype", help="passed to from_pretrained (float32, bfloat16, auto, ...)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; the maximum of each peak is reported")
    parser.add_argument("--output", default=str(REPO / "eval/results/merged_memory.json"))
    args = parser.parse_args()
    wall = time.perf_counter()

    dtype = {} if args.dtype is None else {"dtype": args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)}
    model = AutoModelForCausalLM.from_pretrained(args.model, **dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    cfg = model.config
    if args.heads:
        if args.heads == "router" and model.router is None:
            parser.error(f"{args.model} was saved with heads '{cfg.heads}' and has no router")
        cfg.heads = args.heads
    if cfg.own_tokenizers:
        sys.exit(f"{cfg.own_tokenizers} read with their own tokenizers: not measured here (one batch of tokens)")
    device = next(model.parameters()).device
    if device.type != "cuda" and not os.access("/proc/self/clear_refs", os.W_OK):
        sys.exit("/proc/self/clear_refs is not writable: the peak RSS cannot be reset here")

    context = min(model.sources[n].config.get_text_config(decoder=True).max_position_embeddings for n in cfg.names)
    B, T = args.batch, min(args.seq, context)
    if T < args.seq:
        print(f"--seq {args.seq} exceeds the sources' context of {context} tokens: measuring {B} x {T}")
    ids = token_batch(tokenizer, B, T)
    mask = torch.ones_like(ids)
    V = model.target.get_output_embeddings().weight.shape[0]

    def source(name):
        at = model.sources[name].device
        return lambda: model.sources[name](input_ids=ids.to(at), attention_mask=mask.to(at))

    forwards = {**{n: source(n) for n in cfg.names},
                "merged": lambda: model(input_ids=ids.to(device), attention_mask=mask.to(device))}
    peaks, held = {k: [] for k in forwards}, {k: [] for k in forwards}
    for _ in range(args.repeats):
        for k, forward in forwards.items():
            peak, before = measure(forward, device)
            peaks[k].append(peak)
            held[k].append(before)
    peak = {k: max(v) for k, v in peaks.items()}
    total = sum(peak[n] for n in cfg.names)

    record = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "args": vars(args),
        "model": args.model, "sources": cfg.names, "heads": cfg.heads, "batch": B, "seq": T, "vocab": V,
        "dtype": str(next(model.parameters()).dtype), "device": str(device), "method": "cuda max_memory_allocated"
        if device.type == "cuda" else "VmHWM after clear_refs - VmRSS before" + (" (malloc_trim)" if TRIM else ""),
        "peak_gib": {n: peak[n] for n in cfg.names}, "sum_sources_gib": total, "merged_gib": peak["merged"],
        "ratio": peak["merged"] / total, "goal_ratio": 1.2, "loaded_gib": max(held["merged"]),
        "held_before_gib": {k: max(v) for k, v in held.items()}, "logits_f32_gib": B * T * V * 4 / GIB,
        "peaks_per_round_gib": peaks, "wall_seconds": time.perf_counter() - wall,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }
    output = Path(args.output)
    rows = json.loads(output.read_text()) if output.exists() else []
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(rows + [record], indent=2) + "\n")

    print(f"{args.model}: heads {cfg.heads}, {B} x {T} tokens, vocab {V}, {record['dtype']} on {device}; "
          f"loaded {record['loaded_gib']:.3f} GiB; peaks in GiB, max of {args.repeats}")
    for n in cfg.names:
        print(f"  {n:16} {peak[n]:8.3f}")
    print(f"  {'sum of sources':16} {total:8.3f}")
    print(f"  {'merged':16} {peak['merged']:8.3f}   ratio {record['ratio']:.2f} (goal <= 1.2)")
    print(f"  one float32 [B, T, V] logits: {record['logits_f32_gib']:.3f} GiB")
    print(f"wall {record['wall_seconds']:.0f} s; appended to {output}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
