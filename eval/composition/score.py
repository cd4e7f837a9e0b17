#!/usr/bin/env python3
"""Exact match of greedy generations: the composition benchmark's one score. As a script, it scores a merged model
folder (from a recipe, e.g. recipes/composition-linear-receiver.yaml) on the held-out and seen keys, the problems
benchmark.py scores:

    python eval/composition/score.py out/composition-linear-receiver
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import encode, make_task, task_arguments  # noqa: E402


@torch.no_grad()
def exact_match(model, tokenizer, examples, batch_size: int = 64, max_new_tokens: int = 5) -> dict:
    """The share of `examples` whose greedy answer (the tokens generated before ' .') is exactly theirs.
    Prompts are batched by length, so no padding enters any model (speed: `generation_speed`)."""
    model.eval()
    by_length = defaultdict(list)
    for e in examples:
        ids, answer = encode(e, tokenizer)
        *answer, stop = answer  # the answer's tokens, then ' .'
        by_length[len(ids)].append((ids, answer))
    right = 0
    for items in by_length.values():
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            ids = torch.tensor([p for p, _ in chunk])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stop, pad_token_id=stop)
            new = out[:, ids.shape[1]:].tolist()
            for (_, answer), tokens in zip(chunk, new):
                answer_given = tokens[:tokens.index(stop)] if stop in tokens else None
                right += answer_given == answer
    return {"exact_match": right / len(examples), "n": len(examples)}


@torch.no_grad()
def generation_speed(model, ids: torch.Tensor, new_tokens: int = 8, repeats: int = 15) -> float:
    """Generated tokens per second on one batch of equal-length prompts, every row generating `new_tokens`
    (no early stop), median of `repeats` runs after a warm-up."""
    model.eval()
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(ids, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        times.append(time.perf_counter() - start)
    return ids.shape[0] * new_tokens / sorted(times)[len(times) // 2]


def main():
    parser = task_arguments(argparse.ArgumentParser(description=__doc__,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("model", help="a merged model folder (or any causal LM) on the task's tokenizer")
    parser.add_argument("--eval-examples", type=int, default=500)
    args = parser.parse_args()
    import saemerge  # noqa: F401  (registers the merged model with the Auto classes)
    from transformers import AutoModelForCausalLM

    task = make_task(args)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    scores = {split: exact_match(model, task.tokenizer(), task.eval_set(kind, args.eval_examples))["exact_match"]
              for split, kind in (("held-out", "test"), ("seen", "train"))}
    print(json.dumps({"model": args.model, **scores}))


if __name__ == "__main__":
    main()
