#!/usr/bin/env python3
"""Real pretrained sources: Gemma-3-270m (general) x its code specialist (LoRA), merged through aligned SAEs
by recipes/gemma3-270m-general-x-code.yaml, beside the logit and routed ensembles and five mergekit methods
run on the same two models. Every score is lm-eval's bits per byte on the fixed test samples of
eval/tasks/sample.py (saemerge_mix_sample), also given as nats per token with Gemma's tokenizer.

    python eval/zoo/prepare_pretrained.py --only gemma-3-270m    # once
    python eval/gemma_merge.py                                   # ~90 minutes on 2 CPU cores

Writes eval/results/gemma_merge.{json,md,png}; rows are saved as they finish and --resume skips them.
The SAE merge is run as a user runs it (`saemerge merge`, a subprocess, timed); the other rows reuse its
saved folder, which holds both sources. mergekit runs through its own CLI (`mergekit-yaml`) on the
dequantized base (models/gemma-3-270m-hf) and `base+adapter`, mergekit's syntax for a LoRA on a base.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "eval"), str(REPO / "eval/tasks")]

import sample  # noqa: E402
from baselines import domain_scores  # noqa: E402
from saemerge import SAEMergedForCausalLM, evaluate, load_recipe  # noqa: E402
from saemerge.calibrate import calibrate  # noqa: E402

RECIPE = REPO / "recipes/gemma3-270m-general-x-code.yaml"
BASE = REPO / "models/gemma-3-270m-hf"
ADAPTER = REPO / "eval/zoo/gemma3-code-lora"
TASKS = {"prose": "saemerge_prose_sample", "code": "saemerge_code_sample"}
# Every method halfway between the two models: weights 0.5/0.5, t = 0.5, or half the task vector (density 0.5
# where the method sparsifies). With one task vector, task_arithmetic at 0.5 is linear 0.5/0.5 exactly.
MERGEKIT = {
    "linear": {"models": [{"model": "{base}", "parameters": {"weight": 0.5}},
                          {"model": "{code}", "parameters": {"weight": 0.5}}]},
    "task_arithmetic": {"base_model": "{base}", "models": [{"model": "{code}", "parameters": {"weight": 0.5}}]},
    "ties": {"base_model": "{base}", "models": [{"model": "{code}", "parameters": {"weight": 0.5, "density": 0.5}}],
             "parameters": {"normalize": False}},
    "dare_ties": {"base_model": "{base}", "parameters": {"normalize": False},
                  "models": [{"model": "{code}", "parameters": {"weight": 0.5, "density": 0.5}}]},
    "slerp": {"base_model": "{base}", "models": [{"model": "{base}"}, {"model": "{code}"}],
              "parameters": {"t": 0.5}},
}


class Bench:
    def __init__(self, args):
        self.args = args
        self.recipe = load_recipe(RECIPE)
        self.out = REPO / args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out / "gemma_merge.json"
        self.results = json.loads(self.json_path.read_text()) if args.resume and self.json_path.exists() else {"rows": {}}
        self.merged_dir = REPO / self.recipe.output
        self._merged = self.tokenizer = self.counts = None

    def after_merge(self):
        """Every row is scored with the tokenizer the merge saved (the GGUF's, converted by transformers)."""
        self.tokenizer = AutoTokenizer.from_pretrained(self.merged_dir)
        self.counts = {d: self._bytes_and_tokens(d) for d in TASKS}
        self.results["setup"] = {"recipe": yaml.safe_load(RECIPE.read_text()), "tokens": self.counts,
                                 "torch_threads": torch.get_num_threads(), "mergekit": MERGEKIT,
                                 "versions": {p: version(p) for p in ("torch", "transformers", "peft", "lm_eval",
                                                                      "mergekit")}}

    def _bytes_and_tokens(self, domain):
        with gzip.open(REPO / f"eval/data/{domain}/test.jsonl.gz", "rt") as f:
            docs = {"text": [json.loads(line)["text"] for line in f]}
        texts = getattr(sample, domain)(docs)["text"]
        return sum(len(t.encode()) for t in texts), sum(len(self.tokenizer(t)["input_ids"]) for t in texts)

    def scores(self, results: dict) -> dict:
        return domain_scores(results, TASKS, self.counts)

    def score(self, model) -> dict:
        start = time.perf_counter()
        results = evaluate(model, self.tokenizer, ["saemerge_mix_sample"], include_path=REPO / "eval/tasks",
                           batch_size=self.recipe.eval.batch_size, max_length=self.recipe.eval.max_length)
        return {**self.scores(results), "eval_seconds": round(time.perf_counter() - start, 1)}

    def save(self, name, entry):
        self.results["rows"][name] = entry
        self.json_path.write_text(json.dumps(self.results, indent=2))
        print(f"{name:58s} prose {entry['prose']['loss']:.3f}  code {entry['code']['loss']:.3f}  "
              f"mix {entry['mix']['loss']:.3f}  ({entry['seconds']:.0f}s)", flush=True)

    def row(self, name, group, build):
        if name in self.results["rows"]:
            print(f"[skip] {name}")
            return
        start = time.perf_counter()
        model, extra = build()
        entry = {"group": group, **self.score(model), **(extra or {})}
        entry["seconds"] = round(time.perf_counter() - start, 1)
        self.save(name, entry)

    # --- the SAE merge, as a user runs it --------------------------------------------------------------------
    def sae_merge(self):
        name = "SAE merge (the recipe: router + gates, calibrated)"
        if name in self.results["rows"]:
            return
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "saemerge", "merge", str(RECIPE), "--overwrite", "--quiet"],
                       cwd=REPO, check=True)
        seconds = round(time.perf_counter() - start, 1)
        self.after_merge()
        metrics = json.loads((self.merged_dir / "metrics.json").read_text())
        results = json.loads((self.merged_dir / "eval_results.json").read_text())["results"]
        self.save(name, {"group": "SAE merge", **self.scores(results), "seconds": seconds,
                         "timings": metrics["timings"], "sae_metrics": metrics["sites"],
                         "calibration": metrics.get("calibration")})

    def merged(self):
        if self._merged is None:
            self._merged = AutoModelForCausalLM.from_pretrained(self.merged_dir, use_safetensors=True).eval()
        return self._merged

    def variant(self, calibrated=False, **changes):
        """The saved merged model's sources and SAEs under another merge setting (e.g. scale 0: no exchange)."""
        def build():
            config = copy.deepcopy(self.merged().config)
            for key, value in changes.items():
                setattr(config, key, value)
            model = SAEMergedForCausalLM(config, sources=dict(self.merged().sources),
                                         saes=[dict(site) for site in self.merged().saes]).eval()
            extra = None
            if calibrated:
                recipe = self.recipe.model_copy(deep=True)
                recipe.merge.heads, recipe.merge.scale, recipe.merge.gates = config.heads, config.scale, config.gates
                extra = {"calibration": calibrate(model, recipe, self.tokenizer, progress=False)}
            return model, extra
        return build

    def source(self, name):
        return lambda: (self.merged().sources[name], None)

    # --- mergekit, as its users run it -----------------------------------------------------------------------
    def mergekit(self, method):
        def build():
            text = json.dumps({"merge_method": method, "dtype": "float32", **MERGEKIT[method]})
            config = json.loads(text.replace("{base}", str(BASE)).replace("{code}", f"{BASE}+{ADAPTER}"))
            folder = REPO / "out/mergekit" / method
            folder.parent.mkdir(parents=True, exist_ok=True)
            (folder.parent / f"{method}.yml").write_text(yaml.safe_dump(config))
            start = time.perf_counter()
            cli = Path(sys.executable).with_name("mergekit-yaml")
            command = [str(cli), str(folder.parent / f"{method}.yml"), str(folder), "--copy-tokenizer", "--allow-crimes",
                       "--lora-merge-cache", str(folder.parent / "lora-cache")]  # where mergekit applies the LoRA
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"mergekit {method} failed: {proc.stderr.strip()[-2000:]}")
            merge_seconds = round(time.perf_counter() - start, 1)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            return model, {"mergekit_config": config, "command": " ".join(command[1:]), "merge_seconds": merge_seconds}
        return build

    def run(self):
        self.sae_merge()
        if self.tokenizer is None:  # resumed after the merge
            self.after_merge()
        self.row("general alone (Gemma-3-270m GGUF)", "source", self.source("general"))
        self.row("code alone (GGUF + LoRA)", "source", self.source("code"))
        for method in ("linear", "ties", "dare_ties", "slerp"):
            self.row(f"mergekit {method}", "mergekit", self.mergekit(method))
        self.row("logit ensemble (mean of the two distributions)", "baseline",
                 self.variant(heads="mean", scale=0.0, gates=[]))
        self.row("mergekit task_arithmetic", "mergekit", self.mergekit("task_arithmetic"))  # = linear here
        self.row("routed ensemble (learned per-token router, no feature exchange)", "baseline",
                 self.variant(calibrated=True, heads="router", scale=0.0, gates=[]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", default="eval/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    os.chdir(REPO)  # the recipe and the task YAMLs name their files relative to the repository root
    Bench(args).run()
    from gemma_report import write_report
    write_report(REPO / args.out / "gemma_merge.json")


if __name__ == "__main__":
    main()
