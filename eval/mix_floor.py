#!/usr/bin/env python3
"""How far can the heads' mixture shrink? saemerge.heads.mix_heads against the least an exact mixture computes.

    python eval/mix_floor.py                                  # the quickstart's shape: 4 x 128 positions, 8,192 tokens
    OMP_NUM_THREADS=1 python eval/mix_floor.py

log sum_s w_s softmax(l_s) needs at least one exp per source and one log per element: `exps + log` times
only those (into preallocated tensors), `compiled` the same mixture fused by torch.compile (inductor; skipped
without a C++ compiler), `chunks of N` mix_heads over N positions at a time (cache-sized pieces). `heads + ...`:
the same with each source's output head (a [vocab, width] matmul, as saemerge.heads.mixed_log_probs applies it) inside
each chunk. Two sources, logits drawn N(0, 3^2) (no row underflows, so mix_heads takes its fast path).
Repeats interleaved, medians; appends to eval/results/mix_floor.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from saemerge.heads import mix_heads

REPO = Path(__file__).resolve().parent.parent


def fused_mixture(a: torch.Tensor, b: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    return (a.softmax(-1) * log_weights[..., :1].exp() + b.softmax(-1) * log_weights[..., 1:].exp()).log()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--width", type=int, default=256, help="hidden width of the heads (`heads + ...`)")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--output", default=str(REPO / "eval/results/mix_floor.json"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)  # inference: mix_heads works in place, and torch.compile specialises on it
    torch.manual_seed(0)
    logits = [torch.randn(args.batch, args.seq, args.vocab) * 3 for _ in range(2)]
    log_weights = torch.randn(args.batch, args.seq, 2).log_softmax(-1)
    positive, out = logits[0].abs() + 1e-3, [torch.empty_like(logits[0]) for _ in range(4)]  # no allocation timed
    hidden = [torch.randn(args.batch, args.seq, args.width) for _ in range(2)]
    heads = [torch.randn(args.vocab, args.width) * 3 / args.width ** 0.5 for _ in range(2)]

    def in_chunks(n: int, with_heads: bool):  # mix_heads works in place: fresh copies each call (`copies` times those)
        def mixed(i):
            part = ([x[:, i:i + n] @ w.T for x, w in zip(hidden, heads)] if with_heads
                    else [x[:, i:i + n].clone() for x in logits])
            return mix_heads(log_weights[:, i:i + n], part)

        def run():  # as saemerge.heads.mixed_log_probs: one chunk returned, several written into one output
            if n >= args.seq:
                return mixed(0)
            for i in range(0, args.seq, n):
                out[3][:, i:i + n] = mixed(i)
        return run

    parts = {"copies": lambda: [x.clone() for x in logits],
             "mix_heads": lambda: mix_heads(log_weights, [x.clone() for x in logits]),
             "exps + log": lambda: (torch.exp(logits[0], out=out[0]), torch.exp(logits[1], out=out[1]),
                                   torch.log(positive, out=out[2]))}
    for n in (16, 64):
        parts[f"chunks of {n}"] = in_chunks(n, with_heads=False)
    for n in (args.seq, 16, 64):
        parts[f"heads + chunks of {n}"] = in_chunks(n, with_heads=True)
    try:
        compiled = torch.compile(fused_mixture)
        compiled(*logits, log_weights)  # compile outside the timing
        parts["compiled"] = lambda: compiled(*logits, log_weights)
    except Exception as error:  # no C++ compiler, or inductor unsupported here
        print(f"compiled: skipped ({type(error).__name__}: {str(error).splitlines()[0]})")
    times = {name: [] for name in parts}
    for _ in range(args.repeats):
        for name, run in parts.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    ms = {name: round(statistics.median(t) * 1e3, 2) for name, t in times.items()}
    for name, value in ms.items():
        print(f"{name:>14}: {value:8.2f} ms")
    record = {"shape": [args.batch, args.seq, args.vocab], "repeats": args.repeats, "median_ms": ms,
              "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()}, torch {torch.__version__}"}
    output = Path(args.output)
    rows = json.loads(output.read_text()) if output.exists() else []
    output.write_text(json.dumps(rows + [record], indent=1) + "\n")
    print(f"appended to {output}")


if __name__ == "__main__":
    main()
