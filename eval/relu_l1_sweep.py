"""ReLU SAEs: how sparse and how faithful they are for each L1 coefficient, on the quickstart's sources and
budget (recipes/quickstart.yaml with `latent.activation: relu`, every other setting as there), beside the recipe's
own TopK SAEs (the control: same sources, data, budget and steps).

    python eval/relu_l1_sweep.py [--l1 0.001 0.01 0.03 0.1 0.3] [--recipe recipes/quickstart.yaml]

Measured on the held-back batches of the training mixture that every merge measures (not a test split); writes
eval/results/relu_l1_sweep.json. What it is for: choosing `latent.l1`'s default, which must give sparse codes.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from saemerge import load_recipe, load_tokenizer, train_from_recipe, validate
from saemerge.pipeline import load_sources

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes/quickstart.yaml"))
    parser.add_argument("--l1", type=float, nargs="+", default=[0.001, 0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--out", default=str(REPO / "eval/results/relu_l1_sweep.json"))
    args = parser.parse_args()
    rows = []
    runs = [["latent.activation=relu", f"latent.l1={l1}"] for l1 in args.l1] + [[]]  # the last: the recipe as written
    for overrides in runs:
        recipe = load_recipe(args.recipe, overrides + ["train.device=cpu"])
        paths = validate(recipe, overwrite=True)
        sources = load_sources(recipe)
        start = time.perf_counter()
        _, metrics = train_from_recipe(recipe, sources, paths, load_tokenizer(recipe.models[0]), progress=False)
        site = metrics["sites"][0]
        rows.append({"activation": recipe.latent.activation, "k": recipe.latent.k, "l1": recipe.latent.l1,
                     "seconds": round(time.perf_counter() - start, 1),
                     **{f"{n}_{k}": round(v, 4) for n, m in site["sources"].items() for k, v in m.items()},
                     **{f"{p}_{k}": round(v, 4) for p, m in site["pairs"].items() for k, v in m.items()}})
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"recipe": args.recipe, "latent_size": recipe.latent.size,
                                          "tokens": recipe.data.tokens, "torch": torch.__version__,
                                          "machine": platform.machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
