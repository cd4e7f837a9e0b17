#!/usr/bin/env python3
"""The universality experiments: do two models learn the same features at the same layer? One row per pair of
models, each differing from the other in one thing (the SAE's seed only, the model's seed, its data, its width,
the layer, a fine-tune), every number from one command:

    python eval/zoo/train_zoo.py prose --seed 1 --save-as prose-seed1    # once each (~10 min): the pairs' models
    python eval/zoo/train_zoo.py prose --width 128 --save-as prose-w128
    python eval/universality.py              # eval/results/universality.{json,md,png}; --rows NAME,... --resume

Per row, two kinds of SAEs are trained on the same tokens (train split of what both models know: prose, or the
prose + code mixture for the prose-vs-code and Gemma rows):
- independent: one SAE per model, each from its own seed (its own initial latents, its own data order); the
  question "do they find the same features?" is asked of these. Latents are paired by the correlation of their
  activations on the same tokens (Hungarian); decoder cosines only where the two residual streams share a basis
  (the same model; a base model and its fine-tune).
- aligned: trained jointly with saemerge's alignment loss (latent i of one is latent i of the other); asked "how
  much of the joint dictionary fires in both models?" and "does one model's code, decoded by the other's SAE,
  carry the other's next token?".
Beside them, the stitching penalty of the two models at the row's layers (an affine map from A's residual to B's,
B's CE increase over its own). Every measure is taken on held-out tokens (validation split; the test split is
never read).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
from saemerge import (compare_activations, compare_saes, fit_stitch, load_tokenizer, parse_recipe,
                      train_from_recipe, train_saes)
from saemerge.checks import check_sources
from saemerge.data import token_batches
from saemerge.harvest import recipe_batches
from saemerge.pipeline import load_sources

OUT = REPO / "eval/results"


def corpus(kind: str, split: str) -> list[dict]:
    """prose, or mix (prose + code, half each): what both models of a row were trained on, so that no measure
    reads text one model never saw (a prose model's residual on code is noise: even its mean predicts better)."""
    return [{"path": "json", "data_files": f"eval/data/{d}/{split}.jsonl.gz", "text_column": "text",
             "weight": 1 / len(domains)} for domains in [["prose"] if kind == "prose" else ["prose", "code"]]
            for d in domains]

GEMMA = "models/gemma-3-270m"


@dataclass
class Row:
    name: str
    differs: str  # what the two models differ in
    a: dict  # a recipe's model entry: {model, gguf_file?, adapter?}
    b: dict
    layer_a: int
    layer_b: int
    shared_basis: bool  # decoder cosines mean something
    data: str = "prose"


def zoo(name: str) -> dict:
    return {"model": f"eval/zoo/{name}"}


GEMMA_BASE = {"model": GEMMA, "gguf_file": "gemma-3-270m-q4_k_m.gguf"}
ROWS = [
    Row("same model (ceiling)", "nothing but the SAE's seed", zoo("prose"), zoo("prose"), 1, 1, True),
    Row("seeds", "the model's seed (initialisation, data order)", zoo("prose"), zoo("prose-seed1"), 1, 1, False),
    Row("data", "training data (prose vs code)", zoo("prose"), zoo("code"), 1, 1, False, "mix"),
    Row("sizes", "width (256 vs 128)", zoo("prose"), zoo("prose-w128"), 1, 1, False),
    Row("early layer (seeds)", "the model's seed, at block 0", zoo("prose"), zoo("prose-seed1"), 0, 0, False),
    Row("late layer (seeds)", "the model's seed, at block 3", zoo("prose"), zoo("prose-seed1"), 3, 3, False),
    Row("base vs fine-tune", "a code LoRA (Gemma-3-270m, block 6)", GEMMA_BASE,
        {**GEMMA_BASE, "adapter": "eval/zoo/gemma3-code-lora"}, 6, 6, True, "mix"),
]


def recipe(row: Row, args, align: float, seed: int = 0):
    """The pair as a saemerge recipe: the quickstart's SAE and data settings, the row's models and layers."""
    raw = {"name": "universality",
           "models": [{"name": "A", **row.a, "layer": row.layer_a}, {"name": "B", **row.b, "layer": row.layer_b}],
           "latent": {"size": args.latents, "activation": "topk", "k": args.k, "align": align, "init": "data"},
           "data": {"datasets": corpus(row.data, "train"), "seq_len": 128, "tokens": args.tokens},
           "train": {"batch_tokens": 2048, "lr": 1e-3, "seed": seed, "eval_tokens": 8192,
                     "resample_every": 0 if "gemma" in str(row.a) else 25},
           "merge": {"target": "B"}, "output": "/tmp/universality-unused"}
    return parse_recipe(raw, f"row '{row.name}'")


class Pair:
    """The row's two models, loaded once, and their SAEs."""

    def __init__(self, row: Row, args):
        self.row, self.args = row, args
        self.recipe = recipe(row, args, align=1.0)
        self.paths = check_sources(self.recipe)
        self.sources = load_sources(self.recipe)
        self.tokenizer = load_tokenizer(self.recipe.models[1])

    def aligned_saes(self) -> dict:
        saes, _ = train_from_recipe(self.recipe, self.sources, self.paths, self.tokenizer, progress=not self.args.quiet)
        return saes[0]

    def independent_saes(self) -> dict:
        """One SAE per model, each alone (no alignment loss, nothing shared), seeds 1 and 2."""
        out = {}
        for seed, name in ((1, "A"), (2, "B")):
            r = recipe(self.row, self.args, align=0.0, seed=seed)
            batch = max(1, r.train.batch_tokens // r.data.seq_len)
            steps = -(-r.data.tokens // (batch * r.data.seq_len))
            one, paths = {name: self.sources[name]}, {name: self.paths[name]}
            saes, _ = train_saes(
                lambda start, r=r, one=one, paths=paths: recipe_batches(r, one, paths, self.tokenizer, batch, start),
                r.latent, r.train, steps, progress=not self.args.quiet, tokens_per_step=batch * r.data.seq_len)
            out[name] = saes[0][name]
        return out

    def tokens(self, datasets: list[dict], n: int, seed: int) -> list[torch.Tensor]:
        spec = parse_recipe(copy.deepcopy(self.recipe.model_dump(mode="json")) | {
            "data": {"datasets": datasets, "seq_len": 128, "tokens": n}}).data
        return list(itertools.islice(token_batches(spec, self.tokenizer, 16, seed), -(-n // (16 * 128))))

    def measure(self) -> dict:
        args, row = self.args, self.row
        held_out = self.tokens(corpus(row.data, "validation"), args.eval_tokens, seed=0)
        models = (self.sources["A"], self.sources["B"], self.paths["A"][0], self.paths["B"][0])
        result, start = {"differs": row.differs, "layers": [row.layer_a, row.layer_b]}, time.perf_counter()
        independent = self.independent_saes()
        result["independent"] = numbers(compare_activations(
            *models, independent["A"], independent["B"], held_out, aligned=False, tokenizer_a=self.tokenizer,
            tokenizer_b=self.tokenizer, progress=not args.quiet))
        if row.shared_basis:
            decoders = compare_saes(independent["A"], independent["B"])
            result["independent"]["decoder"] = {"mmcs": decoders["mmcs"],
                                                "matched_above": decoders["matching"]["above"]}
        aligned = self.aligned_saes()
        result["aligned"] = numbers(compare_activations(
            *models, aligned["A"], aligned["B"], held_out, aligned=True, tokenizer_a=self.tokenizer,
            tokenizer_b=self.tokenizer, progress=not args.quiet))
        train_rows = torch.cat(self.tokens(corpus(row.data, "train"), args.stitch_tokens, seed=1))
        stitch = fit_stitch(self.sources["A"], self.sources["B"], row.layer_a, row.layer_b, train_rows,
                            torch.cat(held_out), steps=args.stitch_steps, controls=True, progress=not args.quiet)
        result["stitch"] = {"ce": stitch["ce"], "penalty": stitch["penalty"], "ce_recovered": stitch["ce_recovered"]}
        result["seconds"] = round(time.perf_counter() - start)
        return result


def numbers(report: dict) -> dict:
    """What the table shows of compare_activations' report (no per-latent arrays)."""
    return {key: report[key] for key in ("tokens", "firing", "matching", "cofiring", "cross", "latent_map")
            if key in report}


def recovered(cross: dict) -> str:
    """CE recovered both ways, where mean ablation costs the receiving model at least 0.5 nats (else the ratio
    swings wildly: a prose model on code predicts no better from its own residual than from its mean)."""
    cells = []
    for key in ("a->b", "b->a"):
        c = cross.get(key)
        gap = c["ce_mean"] - c["ce_clean"] if c else 0
        cells.append(f"{c['ce_recovered']:.0%}" if c and gap >= 0.5 else f"n/a (gap {gap:.2f})" if c else "-")
    return " / ".join(cells)


def table(results: dict) -> str:
    lines = ["| pair | differs in | independent SAEs: mean max corr A->B / B->A | matched corr > 0.7 | "
             "decoder MMCS A->B | CE recovered through the matching A->B / B->A | aligned SAEs: latents firing in "
             "both | latent i corr | CE recovered A->B / B->A | "
             "stitching penalty, least squares / CE-trained (random A) |",
             "|" + "---|" * 10]
    for name, r in results["rows"].items():
        ind, al, st = r["independent"], r["aligned"], r["stitch"]
        m, dec, pen = ind["matching"], ind.get("decoder"), st["penalty"]
        lines.append(
            f"| {name} | {r['differs']} | {m['mmc_a_to_b']:.3f} / {m['mmc_b_to_a']:.3f} | {m['above']['0.7']:.1%} | "
            f"{'%.3f' % dec['mmcs']['a_to_b'] if dec else 'n/a (no shared basis)'} | {recovered(ind.get('cross', {}))} "
            f"| {al['firing']['shared']:.1%} | {al['matching']['diagonal_mean']:.3f} | {recovered(al['cross'])} | "
            f"{pen['lstsq']:.2f} / {pen['trained']:.2f} ({pen['random_trained']:.2f}) |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--latents", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=60_000, help="SAE training tokens")
    parser.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens for every measure")
    parser.add_argument("--stitch-tokens", type=int, default=16_384, help="stitch training tokens (train split)")
    parser.add_argument("--stitch-steps", type=int, default=30, help="CE training steps of the stitch")
    parser.add_argument("--resume", action="store_true", help="skip rows already in the JSON")
    parser.add_argument("--redraw", action="store_true", help="only write the table and figure again from the JSON")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", default=str(OUT / "universality"), help="path stem of the results")
    args = parser.parse_args()
    out = Path(args.out)
    path = out.with_suffix(".json")
    results = json.loads(path.read_text()) if args.resume and path.exists() else {"rows": {}}
    settings = {k: v for k, v in vars(args).items() if k not in ("rows", "resume", "quiet", "out")}
    if args.redraw:
        results, chosen = json.loads(path.read_text()), []
    else:
        chosen = [r for r in ROWS if not args.rows or r.name in args.rows.split(",")]
    for row in chosen:
        if row.name in results["rows"]:
            continue
        print(f"--- {row.name}", flush=True)
        results["rows"][row.name] = entry = {"settings": settings, **Pair(row, args).measure()}
        print(json.dumps({k: entry[k] for k in ("stitch", "seconds")}), flush=True)
        path.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(table(results))
    plot(results, out.with_suffix(".png"))
    print(table(results))



def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["rows"])
    rows = [results["rows"][n] for n in names]
    panels = [("independent SAEs: matched pairs with\nactivation correlation > 0.7",
               [r["independent"]["matching"].get("above", {}).get("0.7", 0) for r in rows]),
              ("aligned SAEs: latents firing in both", [r["aligned"]["firing"].get("shared", 0) for r in rows]),
              ("stitching penalty, nats/token\n(CE-trained affine map)",
               [r["stitch"]["penalty"]["trained"] for r in rows])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.5 * len(names) + 1.8), sharey=True)
    for ax, (title, values) in zip(axes, panels):
        ax.barh(range(len(names)), values, color="tab:blue")
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
