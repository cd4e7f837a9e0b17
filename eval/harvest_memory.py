#!/usr/bin/env python3
"""Peak memory of harvesting + SAE training at two token budgets, one 4x the other, each in a fresh process.

    python eval/harvest_memory.py                                   # the Gemma-3-270m recipe, 20k and 80k tokens
    python eval/harvest_memory.py --recipe recipes/quickstart.yaml --tokens 50000
    python eval/harvest_memory.py --recipe recipes/quickstart.yaml --tokens 50000 --set data.cache=/tmp/acts

Activations are streamed (harvested `train.shuffle_batches` batches at a time, shuffled, trained on and
dropped), so the peak should be the sources plus a fixed working set, whatever the budget. The peak is Linux's
VmHWM, reset after the sources are loaded (loading a GGUF has its own transient peak, reported apart). With
`--set data.cache=DIR` the smaller run fills the cache and the larger one reads it and adds to it.
Appends to eval/results/harvest_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, time
from saemerge import load_recipe, load_source, train_from_recipe
from saemerge.sources import check_sources, load_tokenizer

def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 2**20  # GiB

recipe = load_recipe(sys.argv[1], overrides=[f"data.tokens={sys.argv[2]}", *sys.argv[3:]])
paths = check_sources(recipe)
tokenizer = load_tokenizer(recipe.models[0])
sources = {s.name: load_source(s) for s in recipe.models}
out = {"load_peak_gib": status("VmHWM"), "after_load_gib": status("VmRSS")}
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
start = time.perf_counter()
saes, metrics = train_from_recipe(recipe, sources, paths, tokenizer, progress=False)
out.update(train_peak_gib=status("VmHWM"), train_seconds=time.perf_counter() - start,
           train_tokens=metrics["train_tokens"])
print(json.dumps(out))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/gemma3-270m-general-x-code.yaml")
    parser.add_argument("--tokens", type=int, default=20000, help="the smaller budget; the other is 4x")
    parser.add_argument("--set", action="append", default=[], help="recipe override, as for saemerge merge")
    parser.add_argument("--out", default="eval/results/harvest_memory.json")
    args = parser.parse_args()
    runs = {}
    for tokens in (args.tokens, 4 * args.tokens):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, args.recipe, str(tokens), *args.set], cwd=REPO,
                              capture_output=True, text=True, check=True)
        runs[tokens] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": time.perf_counter() - start}
        print(tokens, runs[tokens], flush=True)
    small, large = runs[args.tokens], runs[4 * args.tokens]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    result = {"recipe": args.recipe, "overrides": args.set, "runs": runs,
              "peak_ratio_4x": large["train_peak_gib"] / small["train_peak_gib"],
              "working_set_gib": {t: r["train_peak_gib"] - r["after_load_gib"] for t, r in runs.items()},
              "commit": commit.strip(), "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    out = REPO / args.out
    records = json.loads(out.read_text()) if out.is_file() else []
    records = records if isinstance(records, list) else [records]
    out.write_text(json.dumps(records + [result], indent=2))
    print(f"peak RSS while training: {small['train_peak_gib']:.2f} GiB at {args.tokens} tokens, "
          f"{large['train_peak_gib']:.2f} GiB at {4 * args.tokens} (ratio {result['peak_ratio_4x']:.3f}); "
          f"sources alone {small['after_load_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
