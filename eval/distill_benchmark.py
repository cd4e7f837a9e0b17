#!/usr/bin/env python3
"""Distillation benchmark: one model at one model's cost. A student (the merge's target, same size) trained on
a teacher's next-token distribution, beside the teacher, each source, mergekit, the ensembles, and the control
that matters most: the target fine-tuned on the same mixture and tokens with no teacher.

    python eval/distill_benchmark.py                         # zoo prose x code (run recipes/quickstart.yaml first)
    python eval/distill_benchmark.py --split validation      # the split that chooses settings
    python eval/distill_benchmark.py --pair gemma --tokens 24576 --batch-tokens 1024   # Gemma-3-270m (merge first)

Students: from the SAE merge (the teacher the recipe builds: router + gates, calibrated), the same with the feature
term, from the routed ensemble (same router, no feature exchange) and from the logit ensemble; all with the same
settings (`distill` defaults unless given: T 2, half weight on the plain loss). Scores: lm-eval bits per byte on
the split, also as nats per token (one tokenizer); the mixture is the mean of the two domains. Generation speed:
greedy decoding with the KV cache, medians of interleaved repeats, each model beside the target source.
Writes eval/results/distill_<pair>[_validation].{json,md}; rows are saved as they finish, --resume skips them.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "eval"), str(REPO / "eval/tasks")]

import sample  # noqa: E402
from baselines import domain_scores, mergekit_linear  # noqa: E402
from generate_speed import prompts, timed_generate  # noqa: E402
from saemerge import SAEMergedForCausalLM, evaluate, parse_recipe  # noqa: E402
from saemerge.calibrate import calibrate  # noqa: E402
from saemerge.distill import distill  # noqa: E402

PAIRS = {
    "zoo": {"merged": "out/quickstart", "target_source": "code", "domains": {"prose": "prose", "code": "code"},
            "tasks": {"test": ("saemerge_prose", "saemerge_code", "saemerge_mix"),
                      "validation": ("saemerge_prose_val", "saemerge_code_val", "saemerge_mix_val")},
            "max_length": None, "eval_batch": 16},
    "gemma": {"merged": "out/gemma3-270m-general-x-code", "target_source": "code",
              "domains": {"prose": "general", "code": "code"},
              "tasks": {"test": ("saemerge_prose_sample", "saemerge_code_sample", "saemerge_mix_sample")},
              "max_length": 512, "eval_batch": 4},
}


class Bench:
    def __init__(self, args):
        self.args, self.pair = args, PAIRS[args.pair]
        self.folder = REPO / self.pair["merged"]
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.raw = yaml.safe_load((self.folder / "recipe.yaml").read_text())
        suffix = "" if args.split == "test" else f"_{args.split}"
        self.json_path = REPO / args.out / f"distill_{args.pair}{suffix}.json"
        self.results = json.loads(self.json_path.read_text()) if args.resume and self.json_path.exists() else {"rows": {}}
        self.tasks = self.pair["tasks"][args.split]
        self.counts = {d: self._bytes_and_tokens(d) for d in ("prose", "code")}
        self.results["setup"] = {"pair": args.pair, "merged": self.pair["merged"], "split": args.split,
                                 "distill": self.distill_settings(), "domains": self.pair["domains"],
                                 "torch_threads": torch.get_num_threads(),
                                 "tokens_per_domain": self.counts}
        self._teacher = None

    def _bytes_and_tokens(self, domain):
        split = {"test": "test", "validation": "validation"}[self.args.split]
        with gzip.open(REPO / f"eval/data/{domain}/{split}.jsonl.gz", "rt") as f:
            docs = {"text": [json.loads(line)["text"] for line in f]}
        if self.args.pair == "gemma":  # a fixed sample of the test split (eval/tasks/sample.py)
            docs = getattr(sample, domain)(docs)
        return sum(len(t.encode()) for t in docs["text"]), sum(len(self.tokenizer(t)["input_ids"]) for t in docs["text"])

    def distill_settings(self) -> dict:
        a = self.args
        lora = {"lora": {"r": a.lora_r, "alpha": 2 * a.lora_r}} if a.lora_r else {}
        return {"tokens": a.tokens, "batch_tokens": a.batch_tokens, "lr": a.lr, "temperature": a.temperature,
                "ce_weight": a.ce_weight, "log_every": 10, "checkpoint_every": 0, **lora}

    # --- scoring --------------------------------------------------------------------------------------------
    def score(self, model) -> dict:
        prose, code, mix = self.tasks
        results = evaluate(model, self.tokenizer, [mix], include_path=REPO / "eval/tasks",
                           batch_size=self.pair["eval_batch"], max_length=self.pair["max_length"])
        return domain_scores(results, {"prose": prose, "code": code}, self.counts)

    def speed(self, model) -> dict:
        """Generation tokens/s of `model` and of the target source, interleaved; the ratio of the medians."""
        tok = copy.copy(self.tokenizer)
        tok.padding_side = "left"
        tok.pad_token = tok.pad_token or tok.eos_token
        batch = dict(tok(prompts(4), return_tensors="pt", padding=True))
        target = self.teacher().sources[self.pair["target_source"]]
        for m in (model, target):
            m.generation_config.pad_token_id = tok.pad_token_id
        timed_generate(model, batch, 2, True)
        times = {"model": [], "target": []}
        for _ in range(self.args.speed_repeats):
            times["model"].append(timed_generate(model, batch, self.args.new_tokens, True)[0])
            times["target"].append(timed_generate(target, batch, self.args.new_tokens, True)[0])
        per_second = {k: 4 * self.args.new_tokens / statistics.median(v) for k, v in times.items()}
        return {"tokens_per_second": per_second["model"], "target_tokens_per_second": per_second["target"],
                "vs_target": per_second["model"] / per_second["target"]}

    def row(self, name, group, build, speed=False):
        if self.args.rows and name not in self.args.rows:
            return
        if name in self.results["rows"]:
            print(f"[skip] {name}")
            return
        start = time.perf_counter()
        model, extra = build()
        model.eval()
        entry = {"group": group, **self.score(model), **(extra or {})}
        if speed and self.args.speed_repeats:
            entry["generation"] = self.speed(model)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        self.results["rows"][name] = entry
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(self.results, indent=2))
        print(f"{name:64s} prose {entry['prose']['loss']:.3f}  code {entry['code']['loss']:.3f}  "
              f"mix {entry['mix']['loss']:.3f}  ({entry['seconds']:.0f}s)", flush=True)

    # --- models ---------------------------------------------------------------------------------------------
    def teacher(self):
        if self._teacher is None:
            self._teacher = AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32).eval()
        return self._teacher

    def variant(self, calibrated=False, **changes):
        """The SAE merge's sources and SAEs under another merge setting (scale 0: no feature exchange)."""
        config = copy.deepcopy(self.teacher().config)
        for key, value in changes.items():
            setattr(config, key, value)
        model = SAEMergedForCausalLM(config, sources=dict(self.teacher().sources),
                                     saes=[dict(site) for site in self.teacher().saes]).eval()
        extra = {}
        if calibrated:
            recipe = parse_recipe(copy.deepcopy(self.raw), "benchmark recipe")
            recipe.merge.heads, recipe.merge.scale, recipe.merge.gates = config.heads, config.scale, config.gates
            extra["calibration"] = calibrate(model, recipe, self.tokenizer, progress=not self.args.quiet)
        return model, extra

    def routed(self):
        if "routed" not in self.__dict__:
            self.__dict__["routed"] = self.variant(calibrated=True, heads="router", scale=0.0, gates=[])
        return self.__dict__["routed"]

    def student(self, slug, teacher, **settings):
        def build():
            raw = copy.deepcopy(self.raw)
            raw["distill"] = {**self.distill_settings(), **settings}
            recipe = parse_recipe(raw, "benchmark recipe")
            output = REPO / "out/distill" / f"{self.args.pair}-{self.args.split}-lr{self.args.lr:g}" / slug
            model = teacher() if callable(teacher) else teacher
            if isinstance(model, tuple):
                model = model[0]
            folder = distill(model, recipe, self.tokenizer, output, overwrite=True, progress=not self.args.quiet,
                             evaluate_after=False, teacher_name=slug)
            report = json.loads((folder / "distill.json").read_text())
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), {"distill": report}
        return build

    def copy_earlier_rows(self):
        """Rows of eval/results/gemma_merge.json (same test sample, same scorer): mergekit's merges, the sources and
        the logit ensemble do not depend on saemerge's training; the SAE merge and routed ensemble there are an
        earlier run of the same recipe (this run's teacher is a new one)."""
        earlier = json.loads((REPO / "eval/results/gemma_merge.json").read_text())["rows"]
        names = {"general alone (Gemma-3-270m GGUF)": "general alone", "code alone (GGUF + LoRA)": "code alone",
                 "SAE merge (the recipe: router + gates, calibrated)": "SAE merge, an earlier run of the recipe",
                 "routed ensemble (learned per-token router, no feature exchange)": "routed ensemble (no feature exchange)",
                 "logit ensemble (mean of the two distributions)": "logit ensemble (mean of the two distributions)"}
        for name, entry in earlier.items():
            if entry["group"] == "mergekit" or name in names:
                group = "teacher" if entry["group"] in ("SAE merge", "baseline") else entry["group"]
                self.results["rows"].setdefault(names.get(name, name), {
                    **{k: entry[k] for k in ("prose", "code", "mix")}, "group": group,
                    "copied_from": "eval/results/gemma_merge.json"})

    def run(self):
        if self.args.pair == "gemma":
            self.copy_earlier_rows()
        target = self.pair["target_source"]
        for name in self.teacher().config.names:
            self.row(f"{name} alone", "source", lambda n=name: (self.teacher().sources[n], None), speed=name != target)
        self.row("teacher: SAE merge (router + gates, calibrated)", "teacher", lambda: (self.teacher(), None),
                 speed=True)
        self.row("routed ensemble (no feature exchange)", "teacher", self.routed)
        self.row("logit ensemble (mean of the two distributions)", "teacher",
                 lambda: self.variant(heads="mean", scale=0.0, gates=[]))
        if self.args.pair == "zoo":
            self.row("joint (one model trained on the mixture from scratch)", "reference",
                     lambda: (AutoModelForCausalLM.from_pretrained(REPO / "eval/zoo/joint", dtype=torch.float32), None))
            with tempfile.TemporaryDirectory() as tmp:
                self.row("mergekit linear (0.5/0.5)", "mergekit", lambda: (AutoModelForCausalLM.from_pretrained(
                    mergekit_linear([REPO / "eval/zoo/prose", REPO / "eval/zoo/code"], Path(tmp) / "linear"),
                    dtype=torch.float32), None))
        self.row(f"control: {target} fine-tuned on the mixture (no teacher)", "control",
                 self.student("control", self.teacher, ce_weight=1.0))
        self.row("student <- SAE merge", "student", self.student("sae-merge", self.teacher), speed=True)
        self.row("student <- SAE merge + feature term", "student",
                 self.student("sae-merge-features", self.teacher, features=self.args.features))
        self.row("student <- routed ensemble", "student", self.student("routed", self.routed))
        self.row("student <- logit ensemble", "student", self.student(
            "logit-ensemble", lambda: self.variant(heads="mean", scale=0.0, gates=[])))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=PAIRS, default="zoo")
    parser.add_argument("--split", choices=["test", "validation"], default="test")
    parser.add_argument("--tokens", type=int, default=409_600, help="student training tokens (default: 409600)")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--lora-r", type=int, default=0, help="train a LoRA of this rank (alpha 2r; 0: every weight)")
    parser.add_argument("--features", type=float, default=1.0, help="weight of the feature term in its row")
    parser.add_argument("--rows", type=lambda s: [r for r in s.split(",") if r], default=[],
                        help="only these rows (exact names, comma-separated)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--speed-repeats", type=int, default=3)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", default="eval/results")
    args = parser.parse_args()
    if args.split == "validation" and args.pair == "gemma":
        parser.error("--split validation: the Gemma pair is scored on a fixed test sample only")
    torch.manual_seed(0)
    os.chdir(REPO)  # the recipe names its data relative to the repository root
    bench = Bench(args)
    bench.run()
    write_report(bench.json_path)


def write_report(json_path: Path) -> None:
    """The table of every row, then the goals of the issue for each student, into the .md beside the JSON."""
    results = json.loads(json_path.read_text())
    rows, setup = results["rows"], results["setup"]
    lines = [f"# Distillation: {setup['pair']} ({setup['merged']}), {setup['split']} split", "",
             f"Student settings: {setup['distill']}", "",
             "| model | group | prose loss | code loss | mixture loss | prose bpb | code bpb | mixture bpb | "
             "generation tokens/s (x the target source) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        gen = r.get("generation")
        speed = f"{gen['tokens_per_second']:.1f} ({gen['vs_target']:.2f}x)" if gen else "-"
        lines.append(f"| {name}{' *' if 'copied_from' in r else ''} | {r['group']} | {r['prose']['loss']:.3f} | {r['code']['loss']:.3f} | "
                     f"**{r['mix']['loss']:.3f}** | {r['prose']['bpb']:.3f} | {r['code']['bpb']:.3f} | "
                     f"{r['mix']['bpb']:.3f} | {speed} |")
    copied = {r["copied_from"] for r in rows.values() if "copied_from" in r}
    if copied:
        lines += ["", f"\\* copied from {', '.join(sorted(copied))} (same test sample and scorer; its SAE merge is an "
                  "earlier run of the same recipe)."]
    sources = {d: rows[f"{name} alone"] for d, name in setup["domains"].items() if f"{name} alone" in rows}
    mergekit = [r["mix"]["loss"] for r in rows.values() if r["group"] == "mergekit"]
    control = next((r for r in rows.values() if r["group"] == "control"), None)
    joint = next((r for r in rows.values() if r["group"] == "reference"), None)
    students = {n: r for n, r in rows.items() if r["group"] == "student"}
    if students:
        yes = lambda ok: "yes" if ok else "no"
        lines += ["", "Goals (each student against the row named in the column):", "",
                  "| student | mixture below every mergekit method | below the control | "
                  + " | ".join(f"{d} within 1% of {setup['domains'][d]} alone" for d in ("prose", "code") if d in sources)
                  + (" | below the joint model" if joint else "") + " |",
                  "|---|---|---|" + "---|" * sum(d in sources for d in ("prose", "code")) + ("---|" if joint else "")]
        for name, r in students.items():
            cells = [yes(mergekit and r["mix"]["loss"] < min(mergekit)) if mergekit else "-",
                     yes(control and r["mix"]["loss"] < control["mix"]["loss"])]
            cells += [f"{yes(r[d]['loss'] <= 1.01 * sources[d][d]['loss'])} ({r[d]['loss'] / sources[d][d]['loss']:.3f}x)"
                      for d in ("prose", "code") if d in sources]
            if joint:
                cells.append(yes(r["mix"]["loss"] < joint["mix"]["loss"]))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    json_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

if __name__ == "__main__":
    main()
