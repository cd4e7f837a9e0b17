#!/usr/bin/env python3
"""Generation speed of merged models with and without the KV cache, side by side in one run.

    python eval/generate_speed.py                                   # the quickstart merge (run it first)
    python eval/generate_speed.py --model out/gemma3-270m-general-x-code --batch 1 --new-tokens 32 --repeats 3

Greedy decoding of real test-split prompts; each repeat times the cached and the uncached call back to back
(these machines are noisy, so the two are interleaved and medians reported) and checks that both produced
the same tokens. The target source alone, with its own cache, is timed too as the single-model reference.
Appends to eval/results/generate_speed.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import saemerge  # noqa: F401  (registers the merged model class)

REPO = Path(__file__).resolve().parent.parent


def prompts(n: int) -> list[str]:
    """Alternately a prose and a code document from the test splits, cut to their first 120 characters."""
    docs = {}
    for domain in ("prose", "code"):
        with gzip.open(REPO / f"eval/data/{domain}/test.jsonl.gz", "rt") as f:
            docs[domain] = [json.loads(line)["text"][:120] for _, line in zip(range(n), f)]
    return [docs[("prose", "code")[i % 2]][i // 2] for i in range(n)]


def timed_generate(model, batch, new_tokens: int, use_cache: bool) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():  # min_new_tokens: every call decodes exactly new_tokens
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=use_cache)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="out/quickstart", help="merged model folder")
    parser.add_argument("--batch", type=int, default=4, help="prompts per generate call (left-padded)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (prompt + these must fit the context)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=str(REPO / "eval/results/generate_speed.json"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = dict(tokenizer(prompts(args.batch), return_tensors="pt", padding=True))
    model.generation_config.pad_token_id = model.target.generation_config.pad_token_id = tokenizer.pad_token_id
    target = model.target

    times = {"merged, cache": [], "merged, no cache": [], "target alone, cache": []}
    same = True
    timed_generate(model, batch, 2, True)  # warm-up
    for _ in range(args.repeats):
        t_cache, with_cache = timed_generate(model, batch, args.new_tokens, True)
        t_none, without = timed_generate(model, batch, args.new_tokens, False)
        t_target, _ = timed_generate(target, batch, args.new_tokens, True)
        same &= torch.equal(with_cache, without)
        for key, t in zip(times, (t_cache, t_none, t_target)):
            times[key].append(t)
    new = args.batch * args.new_tokens
    tokens_per_second = {k: new / statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model, "heads": model.config.heads, "sources": model.config.names,
        "batch": args.batch, "prompt_tokens": int(batch["input_ids"].shape[1]), "new_tokens": args.new_tokens,
        "repeats": args.repeats, "seconds": times, "tokens_per_second_median": tokens_per_second,
        "cache_speedup": tokens_per_second["merged, cache"] / tokens_per_second["merged, no cache"],
        "merged_cache_vs_target_alone": tokens_per_second["merged, cache"] / tokens_per_second["target alone, cache"],
        "same_tokens_with_and_without_cache": bool(same),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    output = Path(args.output)
    rows = json.loads(output.read_text()) if output.exists() else []
    rows = [r for r in rows if not (r["model"] == args.model and r["batch"] == args.batch)] + [result]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("model", "tokens_per_second_median", "cache_speedup",
                                              "merged_cache_vs_target_alone", "same_tokens_with_and_without_cache")},
                     indent=2))


if __name__ == "__main__":
    main()
