#!/usr/bin/env python3
"""The seed experiment as a benchmark: two GPT-2s trained on different data (eval/zoo/prose, eval/zoo/code),
merged through aligned SAEs, beside the baselines a reviewer asks for. Every number comes from
lm-evaluation-harness on the local tasks in eval/tasks (bits per byte, converted to nats per token with the
shared tokenizer's token counts); the mixture is the unweighted mean of the two domains.

    python eval/seed_experiment.py                      # test split: eval/results/seed_experiment.{json,md,png}
    python eval/seed_experiment.py --split validation   # for choosing settings; the test split chooses nothing
    python eval/seed_experiment.py --no-ablation --rows "logit ensemble,prose alone"

The merges start from recipes/quickstart.yaml; every row and ablation changes only what its name says.
Rows are saved as they finish; --resume skips rows already in the JSON.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "eval"))

import saemerge  # noqa: E402
from saemerge import ResidualHook, build_merged, load_source, parse_recipe, train_from_recipe  # noqa: E402
from saemerge.calibrate import calibrate  # noqa: E402
from saemerge.recipe import set_override  # noqa: E402
from saemerge.sources import check_sources  # noqa: E402
from baselines import mergekit_linear  # noqa: E402

TASKS = {"test": {"prose": "saemerge_prose", "code": "saemerge_code", "mix": "saemerge_mix"},
         "validation": {"prose": "saemerge_prose_val", "code": "saemerge_code_val", "mix": "saemerge_mix_val"}}
FILES = {"test": "test", "validation": "validation"}


class Bench:
    def __init__(self, args):
        self.args = args
        self.raw = yaml.safe_load((REPO / args.recipe).read_text())
        for assignment in args.set:
            set_override(self.raw, assignment)
        self.tokenizer = AutoTokenizer.from_pretrained(REPO / "eval/zoo/tokenizer")
        self.counts = {d: self._bytes_and_tokens(d) for d in ("prose", "code")}
        self.out = REPO / args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out / f"seed_experiment{'' if args.split == 'test' else '_' + args.split}.json"
        self.results = json.loads(self.json_path.read_text()) if args.resume and self.json_path.exists() else \
            {"rows": {}, "ablation": {}}
        self.results["setup"] = {"recipe": self.raw, "split": args.split, "torch_threads": torch.get_num_threads()}
        self._sources = self._saes = None
        self._hooks = []

    # --- scoring --------------------------------------------------------------------------------------------
    def _bytes_and_tokens(self, domain):
        n_bytes = n_tokens = 0
        with gzip.open(REPO / f"eval/data/{domain}/{FILES[self.args.split]}.jsonl.gz", "rt") as f:
            for line in f:
                text = json.loads(line)["text"]
                n_bytes += len(text.encode("utf-8"))
                n_tokens += len(self.tokenizer(text)["input_ids"])
        return n_bytes, n_tokens

    def score(self, model) -> dict:
        tasks = TASKS[self.args.split]
        start = time.perf_counter()
        results = saemerge.evaluate(model, self.tokenizer, [tasks["mix"]], include_path=REPO / "eval/tasks",
                                    batch_size=self.args.batch_size, limit=self.args.limit)
        out = {}
        for domain in ("prose", "code"):
            bpb = results[tasks[domain]]["bits_per_byte"]
            n_bytes, n_tokens = self.counts[domain]
            # lm-eval: bits_per_byte = total NLL / (bytes * ln 2); every model here shares one tokenizer.
            out[domain] = {"bpb": bpb, "loss": bpb * math.log(2) * n_bytes / n_tokens}
        out["mix"] = {k: (out["prose"][k] + out["code"][k]) / 2 for k in ("bpb", "loss")}
        out["eval_seconds"] = round(time.perf_counter() - start, 1)
        return out

    def row(self, name, group, build, section="rows"):
        if self.args.rows and name not in self.args.rows:
            return
        if name in self.results[section]:
            print(f"[skip] {name}")
            return
        start = time.perf_counter()
        model, extra = build()
        entry = {"group": group, **self.score(model), **(extra or {})}
        entry["seconds"] = round(time.perf_counter() - start, 1)
        self.results[section][name] = entry
        self.json_path.write_text(json.dumps(self.results, indent=2))
        print(f"{name:60s} prose {entry['prose']['loss']:.3f}  code {entry['code']['loss']:.3f}  "
              f"mix {entry['mix']['loss']:.3f}  ({entry['seconds']:.0f}s)", flush=True)

    # --- models ---------------------------------------------------------------------------------------------
    def recipe(self, *overrides):
        raw = copy.deepcopy(self.raw)
        for assignment in overrides:
            set_override(raw, assignment)
        return parse_recipe(raw, "benchmark recipe")

    def sources(self):
        if self._sources is None:
            recipe = self.recipe()
            self.paths = check_sources(recipe)
            self._sources = {s.name: load_source(s) for s in recipe.models}
        return self._sources

    def train(self, *overrides):
        recipe = self.recipe(*overrides)
        start = time.perf_counter()
        paths = check_sources(recipe)  # the recipe's own layers (ablations move them)
        self.sources()
        saes, metrics = train_from_recipe(recipe, self._sources, paths, self.tokenizer, progress=not self.args.quiet)
        metrics["train_seconds"] = round(time.perf_counter() - start, 1)
        return saes, metrics

    def saes(self):
        if self._saes is None:
            self._saes = self.train()
            self.results["sae_metrics"] = self._saes[1]
        return self._saes[0]

    def merged(self, *overrides, calibrated=False):
        recipe = self.recipe(*overrides)
        model = build_merged(recipe, self.sources(), self.saes(), self.paths)
        extra = {"recipe_overrides": list(overrides)}
        if calibrated:
            extra["calibration"] = calibrate(model, recipe, self.tokenizer, progress=not self.args.quiet)
        return model, extra

    def alone(self, name):
        return lambda: (self.sources()[name], None)

    def zoo_model(self, folder):
        def build():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            return model, None
        return build

    def spliced_control(self, name):
        def build():
            model = self.sources()[name]
            self._hooks.append(ResidualHook(model, self.paths[name][-1], "replace", sae=self.saes()[-1][name]).attach())
            return model, None
        return build

    # --- the experiment -------------------------------------------------------------------------------------
    def run_rows(self):
        steps = self.raw["merge"].get("calibrate", {}).get("steps", 0) or 100
        cal = [f"merge.calibrate.steps={steps}"]
        self.row("prose alone", "source", self.alone("prose"))
        self.row("code alone", "source", self.alone("code"))
        self.row("logit ensemble (mean of the two distributions)", "baseline",
                 lambda: self.merged("merge.heads=mean", "merge.scale=0", "merge.gates=[]"))
        self.row("routed ensemble (learned per-token router, no feature exchange)", "baseline",
                 lambda: self.merged("merge.heads=router", "merge.scale=0", "merge.gates=[]", *cal, calibrated=True))
        with tempfile.TemporaryDirectory() as tmp:
            self.row("weight average (mergekit linear, 0.5/0.5)", "baseline", self.zoo_model(
                mergekit_linear([REPO / "eval/zoo/prose", REPO / "eval/zoo/code"], Path(tmp) / "linear")))
        for a, b in (("prose", "code"), ("code", "prose")):
            self.row(f"linear stitch {a} -> {b} (dense d x d, trained on next-token loss)", "baseline",
                     lambda b=b: self.merged(f"merge.target={b}", "merge.heads=target", "merge.gates=[]", *cal,
                                             "merge.bridge=linear", calibrated=True))
        self.row("control: code with its own SAE reconstruction spliced in", "control", self.spliced_control("code"))
        while self._hooks:
            self._hooks.pop().detach()
        for a, b in (("prose", "code"), ("code", "prose")):
            for combine in ("sum", "mean"):
                self.row(f"SAE {a} -> {b}, {combine}", "SAE merge",
                         lambda b=b, c=combine: self.merged(f"merge.target={b}", "merge.heads=target",
                                                            f"merge.combine={c}", "merge.gates=[]"))
            self.row(f"SAE {a} -> {b}, mean + latent and token gates (calibrated)", "SAE merge + levers",
                     lambda b=b: self.merged(f"merge.target={b}", "merge.heads=target", "merge.combine=mean",
                                             "merge.gates=[latent, token]", *cal, calibrated=True))
        self.row("SAE, every source keeps its head, heads averaged", "SAE merge + levers",
                 lambda: self.merged("merge.heads=mean", "merge.gates=[]"))
        self.row("SAE, every source keeps its head, router + gates (calibrated)", "SAE merge + levers",
                 lambda: self.merged("merge.heads=router", "merge.gates=[latent, token]", *cal, calibrated=True))
        if (REPO / "eval/zoo/joint/model.safetensors").exists():
            self.row("joint (reference: one model trained on the mixture)", "reference",
                     self.zoo_model(REPO / "eval/zoo/joint"))
        else:
            print("[skip] joint: eval/zoo/joint is not trained (python eval/zoo/train_zoo.py joint)")

    def run_ablation(self):
        """One switch at a time from ReLU SAEs with biases, L1 and alignment (the report's setting), same
        budget, each scored as the plain merge into the code model, mean and sum."""
        base = ["latent.activation=relu", "latent.l1=0.003", "latent.l2=0.0", "latent.bias=true", "latent.align=1.0",
                "latent.cross=0.0", "latent.init=data"]
        variants = {
            "ReLU, bias, L1, align 1 (base)": [],
            "no biases": ["latent.bias=false"],
            "L2 instead of L1": ["latent.l1=0.0", "latent.l2=0.003"],
            "align 0": ["latent.align=0.0"],
            "TopK k=32 instead of ReLU + L1": ["latent.activation=topk", "latent.l1=0.0"],
            "TopK, no dead-latent resampling": ["latent.activation=topk", "latent.l1=0.0", "train.resample_every=0"],
            "late injection (block 3 of 4)": ["models.0.layer=3", "models.1.layer=3"],
            "two sites (blocks 1 and 3)": ["models.0.layer=[1, 3]", "models.1.layer=[1, 3]"],
            "4x the SAE tokens (1M)": ["data.tokens=1000000"],
        }
        for name, changes in variants.items():
            if name in self.results["ablation"] or (self.args.rows and name not in self.args.rows):
                continue
            saes, metrics = self.train(*base, *changes)
            recipe = self.recipe(*base, *changes, "merge.target=code", "merge.heads=target", "merge.gates=[]")
            entry = {"changes": changes, "sae_metrics": metrics}
            for combine in ("mean", "sum") if not changes else ("mean",):  # sum vs mean: on the base only
                recipe.merge.combine = combine
                entry[combine] = self.score(build_merged(recipe, self.sources(), saes, check_sources(recipe)))
            self.results["ablation"][name] = entry
            self.json_path.write_text(json.dumps(self.results, indent=2))
            m = metrics["sites"][-1]["sources"]
            print(f"ablation {name:40s} mix (mean into code) {entry['mean']['mix']['loss']:.3f} "
                  f"EV {m['prose']['explained_variance']:.2f}/{m['code']['explained_variance']:.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the base recipe")
    parser.add_argument("--split", choices=["test", "validation"], default="test")
    parser.add_argument("--rows", type=lambda s: [r.strip() for r in s.split(",")], default=None,
                        help="only these rows / ablations (comma-separated names)")
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (smoke runs only)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="eval/results")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    bench = Bench(args)
    bench.run_rows()
    if not args.no_ablation:
        bench.run_ablation()
    from seed_report import write_report
    write_report(bench.json_path)


if __name__ == "__main__":
    main()
