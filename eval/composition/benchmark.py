#!/usr/bin/env python3
"""The composition benchmark: can a merge of K (knows key -> number) and S (does arithmetic) answer arithmetic over
keys it was never trained to compose, where every ensemble must fail?

    python eval/composition/train_models.py K S J      # the sources and the joint reference (~22 min)
    python eval/composition/benchmark.py               # every row below (README: times); --rows for a subset

Rows: K alone, S alone, the logit and routed ensembles (heads mean / router, scale 0), S fine-tuned on the
composition training set (the control: it cannot know the held-out keys' numbers), J trained on everything (a
reference), the bridges with S frozen (sae with gates, sae trained end to end, linear, cross_attention; 600
steps each), and the three bridges with S trained as the receiver too (`calibrate.receiver`; `--receiver-steps`)
beside their control, S trained the same way without a bridge. Every row trains on batches of 128 rows x 16
tokens of compositions over the train keys, the loss on the answers. Settings (sites, steps, learning rates) were
chosen on the valid keys (`--choose`, learning_curve.py); the test keys are scored once.
Scores: exact match of greedy generation on one problem per test key (held out) and on fresh problems over the
train keys (seen); tokens/s of that generation beside S alone (`--speed-only` times every row again at once).
Writes eval/results/composition.json and a plot.

`--skill-model` runs the real-model case (copy_task.py: S a pretrained model whose skill is copying a number into a
sentence, K trained on its tokenizer by `train_models.py K --skill-model`); README: the command and its settings.

K and S across two tokenizers: K reads with the tokenizer saved beside it (RUNS/K), and when that is not S's (e.g.
`--skill-model models/gemma-3-270m-hf` with the K of runs/copy-smollm2), everything S reads and writes (problems,
answers, scores) stays in S's tokens while K reads the same text in its own through the library (the merged model's
tokenizers; the SAEs' pairs at the positions where both tokenizations end at the same byte). K alone is scored in
its own tokens on the same problems. The ensembles (heads mean / router) need one tokenizer and are skipped, saying
so in the output. `--head-at-answers` makes training cheaper with a large vocabulary (Gemma's 262k tokens): S's
head computes logits only where the loss is taken, the same loss and gradients.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from data import Task, batches, encode, make_task, stream, task_arguments  # noqa: E402
from score import exact_match, generation_speed  # noqa: E402

from saemerge import merged_model  # noqa: E402
from saemerge.calibrate import sae_regulariser, train_on_next_token_loss  # noqa: E402
from saemerge.harvest import activation_batches  # noqa: E402
from saemerge.hooks import resolve_layer  # noqa: E402
from saemerge.modeling import SAEMergedForCausalLM, all_but_embeddings  # noqa: E402
from saemerge.recipe import CalibrateSpec, LatentSpec, MergeSpec, TrainSpec  # noqa: E402
from saemerge.retokenize import Retokenizer, adds_bos, same_tokenizer  # noqa: E402
from saemerge.train import train_saes  # noqa: E402



def slug(row: str) -> str:
    return row.split(" (")[0].replace("bridge ", "").replace(", trained end to end", "-end-to-end").replace(
        ", receiver trained too", "-receiver").replace(" ", "-")


class Skipped(Exception):
    """A row these sources cannot run (why: the message, printed and written beside the rows)."""


def reads_bos_first(tokenizer):
    """`tokenizer`, told to start a sequence with its BOS if it does not by itself. The benchmark's K was trained
    with <bos> first (data.encode, text_batches), and the library gives a sender that reads with its own tokenizer a
    BOS only if that tokenizer adds one (retokenize.adds_bos; SmolLM2's does not). Without it, K alone answers 9.5%
    of held-out copy problems instead of 15.0%."""
    if tokenizer.bos_token_id is not None and not adds_bos(tokenizer):
        tokenizer.add_bos_token = True
        if not adds_bos(tokenizer):
            raise ValueError(f"cannot make {tokenizer.name_or_path}'s tokenizer start a sequence with its BOS")
    return tokenizer


class AnswerHead(torch.nn.Module):
    """A causal LM's output head computing logits only at the positions `where` (zeros elsewhere): training takes
    its loss at the answers only (data.row), and a 262k-token head (Gemma's) over every position costs more than
    the rest of the merge. The loss and its gradients are the same as with the whole head."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.head, self.where = head, None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h.new_zeros(*h.shape[:-1], self.head.out_features)
        out[self.where] = self.head(h[self.where])
        return out


@contextmanager
def head_at_answers(model, data):
    """`data` ((ids, labels) batches) with the head of `model` (a merged model's target, or a causal LM) computing
    logits only where the loss is taken: position t where labels[t + 1] is set. The head is restored after."""
    lm = model.target if isinstance(model, SAEMergedForCausalLM) else model
    head = AnswerHead(lm.get_output_embeddings())

    def marked():
        for ids, labels in data:
            head.where = torch.zeros_like(labels, dtype=torch.bool)
            head.where[:, :-1] = labels[:, 1:] != -100
            yield ids, labels
    lm.set_output_embeddings(head)
    try:
        yield marked()
    finally:
        lm.set_output_embeddings(head.head)


def text_batches(task: Task, tokenizer, seed: int):
    """Token batches of everything the sources read (statements, arithmetic, compositions over the train keys), the
    SAEs' training data: one text per row, rows of one length together, so no padding enters the activations."""
    texts, by_length = stream(task, "joint", seed), {}
    while True:
        ids = [tokenizer.bos_token_id] + tokenizer(next(texts).text, add_special_tokens=False)["input_ids"]
        bucket = by_length.setdefault(len(ids), [])
        bucket.append(ids)
        if len(bucket) == task.rows:
            yield torch.tensor(by_length.pop(len(ids)))


class Benchmark:
    def __init__(self, args):
        self.args = args
        self.task = make_task(args)
        self.tokenizer = self.task.tokenizer()
        self.models = {n: self.load(n) for n in ("K", "S")}
        # K reads with the tokenizer it was trained on; if that is not S's, it reads S's text in its own.
        self.k_tokenizer = self.tokenizer
        if (args.runs / "K" / "tokenizer_config.json").exists():
            own = AutoTokenizer.from_pretrained(args.runs / "K")
            if not same_tokenizer(self.tokenizer, own):
                self.k_tokenizer = reads_bos_first(own)
        self.cross = self.k_tokenizer is not self.tokenizer
        self.tokenizers = {"K": self.k_tokenizer, "S": self.tokenizer} if self.cross else None
        self.retokenizers = {"K": Retokenizer(self.tokenizer, self.k_tokenizer)} if self.cross else None
        self.skipped: dict[str, str] = {}  # row -> why it was not run
        self.layers = {n: [resolve_layer(self.models[n], s) for s in sites]  # block numbers or module names
                       for n, sites in (("K", args.k_layers), ("S", args.s_layers))}
        n = args.eval_examples
        # --choose scores the valid keys only (settings are chosen there); the test keys are scored once, at the end.
        self.sets = ({"valid": self.task.eval_set("valid", n)} if args.choose else
                     {"held-out": self.task.eval_set("test", n), "seen": self.task.eval_set("train", n)})
        self.speed_batch = self.speed_prompts(self.tokenizer)
        self.rows: list[dict] = []
        self.batch_tokens = self.task.rows * self.task.seq_len
        if (args.append or args.speed_only) and args.output.exists():  # rows of an earlier run, those measured again replaced
            earlier = json.loads(args.output.read_text())
            self.rows, self.skipped = earlier["rows"], earlier.get("skipped", {})
        self._saes = None

    def speed_prompts(self, tokenizer) -> torch.Tensor:
        """64 problems over held-out keys, of the commonest length: the generation speed batch."""
        prompts = [encode(e, tokenizer)[0] for e in self.task.eval_set("test", 512)]
        length = max({len(p) for p in prompts}, key=[len(p) for p in prompts].count)
        return torch.tensor([p for p in prompts if len(p) == length][:64])

    def load(self, name: str):
        folder = self.args.skill_model if name == "S" and self.args.skill_model else self.args.runs / name
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)

    def saes(self):
        """Aligned TopK SAEs on K's and S's residuals at the sites, trained once on the sources' own texts."""
        if self._saes is None:
            latent = LatentSpec(size=self.args.latents, k=self.args.k)
            # --sae-resample-every 0 for Gemma: restarting dead TopK latents made its SAE diverge (the Gemma recipes).
            resample = {} if self.args.sae_resample_every is None else {"resample_every": self.args.sae_resample_every}
            train = TrainSpec(batch_tokens=self.batch_tokens, lr=1e-3, seed=self.args.seed, **resample)
            # Across tokenizers (retokenizers), K reads the same texts in its own tokens and only the positions where
            # both tokenizations end at the same byte are paired.
            stream_ = lambda start: activation_batches(self.models, self.layers, text_batches(self.task, self.tokenizer,
                                                                                               self.args.seed), start,
                                                       shuffle_batches=8, seed=self.args.seed,
                                                       retokenizers=self.retokenizers)
            held_back = activation_batches(self.models, self.layers, text_batches(self.task, self.tokenizer, 99),
                                           retokenizers=self.retokenizers)
            start = time.time()
            saes, metrics = train_saes(stream_, latent, train, self.args.sae_steps,
                                       held_back=(next(held_back) for _ in range(4)), progress=not self.args.quiet)
            self._saes = saes, {"seconds": round(time.time() - start), "steps": self.args.sae_steps,
                                "tokens": self.args.sae_steps * self.batch_tokens, **metrics}
            self.latent = latent
        return self._saes[0]

    def merged(self, bridge: str = "sae", heads: str = "target", scale: float = 1.0, gates=()):
        if self.cross and heads != "target":
            raise Skipped(f"heads '{heads}' mixes K's and S's next-token distributions, which needs one tokenizer, and "
                          "K reads with its own (the library takes only heads 'target' across tokenizers)")
        merge = MergeSpec(target="S", inject=["K"], bridge=bridge, heads=heads, scale=scale, gates=list(gates),
                          calibrate=CalibrateSpec())
        # Across tokenizers, the merged model reads S's tokens and K reads their text in its own.
        return merged_model(dict(self.models), copy.deepcopy(self.saes()), self.layers, merge,
                            tokenizers=self.tokenizers)

    def train(self, model, params, lr: float, regulariser=None, steps: int | None = None) -> dict:
        if self.args.speed_only:
            return {}
        start = time.time()
        data = batches(self.task, "composition", self.tokenizer, self.args.seed + 1)
        if self.args.head_at_answers:
            with head_at_answers(model, data) as data:
                metrics = train_on_next_token_loss(model, params, data, steps or self.args.steps, lr,
                                                   progress=not self.args.quiet, desc="training",
                                                   regulariser=regulariser)
            metrics["head"] = "at the answers only (--head-at-answers)"
        else:
            metrics = train_on_next_token_loss(model, params, data, steps or self.args.steps, lr,
                                               progress=not self.args.quiet, desc="training", regulariser=regulariser)
        model.eval()
        return {**metrics, "seconds": round(time.time() - start), "lr": lr}

    def row(self, name: str, kind: str, build, tokenizer=None) -> None:
        """Build, score and time one row; `tokenizer` is the one its model reads (default: S's, the task's)."""
        if self.args.rows and not any(r in name for r in self.args.rows):
            return
        tokenizer = tokenizer or self.tokenizer
        speed_batch = self.speed_batch if tokenizer is self.tokenizer else self.speed_prompts(tokenizer)
        try:
            if self.args.speed_only:  # what a row costs does not depend on what it learned: time it untrained
                row = next((r for r in self.rows if r["row"] == name), None)
                if row is None:
                    return
                row["tokens_per_second"] = generation_speed(build()[0], speed_batch, repeats=self.args.speed_repeats)
                print(name, round(row["tokens_per_second"]), flush=True)
                return
            start = time.time()
            model, trained, extra = build()
        except Skipped as why:
            print(f"skipped: {name}: {why}", flush=True)
            self.skipped[name] = str(why)
            self.rows = [r for r in self.rows if r["row"] != name]
            return
        scores = {split: exact_match(model, tokenizer, examples) for split, examples in self.sets.items()}
        row = {"row": name, "kind": kind, "trained_parameters": trained,
               "training_tokens": extra.get("training", {}).get("steps", 0) * self.batch_tokens, **extra,
               **{f"{split}": s["exact_match"] for split, s in scores.items()},
               "tokens_per_second": generation_speed(model, speed_batch, repeats=self.args.speed_repeats),
               "seconds": round(time.time() - start)}
        if self.cross:  # which tokens its problems, answers and speed are counted in
            row["tokenizer"] = "K" if tokenizer is self.k_tokenizer else "S"
        self.rows = [r for r in self.rows if r["row"] != name] + [row]
        self.skipped.pop(name, None)
        print(json.dumps(row), flush=True)
        if kind == "bridge" and self.args.save:  # a merged model folder like any other (explain_sae.py reads it)
            folder = self.args.runs / "merges" / slug(name)
            model.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)

    def run(self):
        a = self.args
        count = lambda params: sum(p.numel() for p in params)
        # In K's own tokens: across tokenizers, the same problems as K reads them.
        self.row("K alone (knows the keys)", "source", lambda: (self.models["K"], 0, {}), self.k_tokenizer)
        self.row(f"S alone ({self.task.s_does})", "source", lambda: (self.models["S"], 0, {}))
        self.row("logit ensemble (heads mean, scale 0)", "ensemble", lambda: (self.merged(heads="mean", scale=0), 0, {}))

        def routed():
            model = self.merged(heads="router", scale=0)
            params = model.calibration_parameters()
            return model, count(params), {"training": self.train(model, params, a.lr)}
        self.row("routed ensemble (heads router, scale 0, router trained)", "ensemble", routed)

        def fine_tuned(which, lr, steps=None):  # a control: S alone, `which(S)` of its weights trained
            def build():
                model = copy.deepcopy(self.models["S"])
                params = which(model)
                return model, count(params), {"training": self.train(model, params, lr, steps=steps)}
            return build
        self.row("control: S fine-tuned on the compositions (all weights)", "control",
                 fine_tuned(lambda m: list(m.parameters()), a.ft_lr))
        if (a.runs / "J").exists():
            self.row("J: one model trained on K's, S's and the composition data (reference)", "reference",
                     lambda: (self.load("J"), 0, {}))

        def bridge(name, gates=(), saes=False, lr=a.lr, receiver=False, steps=None):
            def build():
                model = self.merged(bridge=name, gates=gates)
                params = model.calibration_parameters(saes, receiver)
                regulariser = sae_regulariser(model, self.latent) if saes else None
                return model, count(params), {"training": self.train(model, params, lr, regulariser, steps)}
            return build
        self.row("bridge sae (latent + token gates trained)", "bridge", bridge("sae", ("latent", "token")))
        self.row("bridge sae, trained end to end (SAEs + gates; SAE losses as regulariser)", "bridge",
                 bridge("sae", ("latent", "token"), saes=True, lr=a.sae_lr))
        self.row("bridge linear (dense map at the same position)", "bridge", bridge("linear"))
        self.row("bridge cross_attention (earlier and current positions)", "bridge", bridge("cross_attention"))

        # S learns to read what the bridge sends (calibrate.receiver), beside its fair control: the same weights
        # of S trained as long on the same data, without a bridge.
        self.row("control: S fine-tuned as the receiver below (all but embeddings, no bridge)", "control",
                 fine_tuned(all_but_embeddings, a.receiver_lr, a.receiver_steps))
        receiver = dict(lr=a.receiver_lr, receiver=True, steps=a.receiver_steps)
        self.row("bridge sae, trained end to end, receiver trained too (calibrate.receiver)", "bridge",
                 bridge("sae", ("latent", "token"), saes=True, **receiver))
        self.row("bridge linear, receiver trained too (calibrate.receiver)", "bridge", bridge("linear", **receiver))
        self.row("bridge cross_attention, receiver trained too (calibrate.receiver)", "bridge",
                 bridge("cross_attention", **receiver))

    def pretrained_skill(self) -> dict:
        """A pretrained S's skill on plain numbers (a trained S has its own in train_log.json)."""
        if not self.args.skill_model:
            return {}
        copy_ = exact_match(self.models["S"], self.tokenizer, self.task.eval_set("skill", self.args.eval_examples))
        return {"S": {"model": str(self.args.skill_model), "skills": {self.task.skill_name: copy_["exact_match"]}}}

    def write(self, seconds: float):
        skill_model = str(self.args.skill_model) if self.args.skill_model else None
        result = {"task": {"kind": self.task.skill_name, "title": self.task.title, "skill_model": skill_model,
                           "keys": self.args.keys, "split_keys": {k: len(v) for k, v in self.task.split_keys.items()},
                           "eval_examples": self.args.eval_examples, "seed": self.args.seed},
                  "sources": {n: json.loads((self.args.runs / n / "train_log.json").read_text())
                              for n in ("K", "S", "J") if (self.args.runs / n).exists()} | self.pretrained_skill(),
                  "layers": self.layers, "steps": self.args.steps, "batch": [self.task.rows, self.task.seq_len],
                  "saes": self._saes[1] if self._saes else None, "rows": self.rows,
                  "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                              "torch": torch.__version__}, "seconds": round(seconds)}
        if self.cross:  # the tokenizer each source reads with; the rows these sources cannot run, and why
            result["task"]["tokenizers"] = {n: t.name_or_path for n, t in self.tokenizers.items()}
            result["skipped"] = self.skipped
        if self.args.speed_only:  # only the speeds are new (the SAEs trained for it were throwaway)
            result = {**json.loads(self.args.output.read_text()), "rows": self.rows,
                      "speed": {"measured": "--speed-only", "threads": torch.get_num_threads()}}
        elif self.args.append and self.args.output.exists():  # the earlier run's fields stand where this one
            earlier = json.loads(self.args.output.read_text())  # measured nothing (its SAEs, its total time)
            result = {**earlier, **{k: v for k, v in result.items() if v is not None and k != "seconds"}}
        for log in result["sources"].values():
            log.pop("curve", None)
        self.args.output.parent.mkdir(parents=True, exist_ok=True)
        self.args.output.write_text(json.dumps(result, indent=2))
        self.args.output.with_suffix(".md").write_text(markdown(result))
        plot(result, self.args.output.with_suffix(".png"))
        print(markdown(result))
        print(f"wrote {self.args.output} (.md, .png)")


KINDS = ["source", "ensemble", "control", "reference", "bridge"]


def ordered(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: KINDS.index(r["kind"]))


def markdown(result: dict) -> str:
    """The README's table: exact match, trained parameters, tokens, generation speed beside S alone."""
    rows = ordered(result["rows"])
    splits = [k for k in ("held-out", "seen", "valid") if k in rows[0]]
    s_speed = next((r["tokens_per_second"] for r in rows if r["row"].startswith("S alone")), None)
    lines = ["| row | " + " | ".join(f"exact match {s}" for s in splits) + " | trained parameters | tokens trained on "
             "| generation tokens/s (x S alone) |", "|---|" + "---|" * (len(splits) + 3)]
    for r in rows:
        speed = f"{r['tokens_per_second']:.0f}" + (f" ({r['tokens_per_second'] / s_speed:.2f}x)" if s_speed else "")
        lines.append(f"| {r['row']} | " + " | ".join(f"{r[s]:.1%}" for s in splits)
                     + f" | {r['trained_parameters']:,} | {r['training_tokens']:,} | {speed} |")
    if "tokenizers" in result["task"]:
        lines.append("\nK reads with its own tokenizer (" + ", ".join(f"{n}: {t}" for n, t in
                                                                     result["task"]["tokenizers"].items())
                     + "); every row reads S's but K alone, scored in K's tokens on the same problems "
                     "(its tokens/s are K's tokens).")
    lines += [f"\nNot run: {row}: {why}." for row, why in result.get("skipped", {}).items()]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ordered(result["rows"])
    splits = [k for k in ("held-out", "seen", "valid") if k in rows[0]]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    height = 0.8 / len(splits)
    for i, split in enumerate(splits):
        ax.barh([j + i * height for j in range(len(rows))], [r[split] * 100 for r in rows], height, label=split)
    ax.set_yticks([j + height * (len(splits) - 1) / 2 for j in range(len(rows))])
    ax.set_yticklabels([r["row"].split(" (")[0] for r in rows])
    ax.invert_yaxis()
    ax.axvline(80, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("exact match (%)")
    ax.set_xlim(0, 100)
    ax.legend(loc="upper right")
    ax.set_title(result["task"].get("title", Task.title), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def arguments(description: str = __doc__) -> argparse.ArgumentParser:
    parser = task_arguments(argparse.ArgumentParser(description=description,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--runs", type=Path, default=HERE / "runs", help="folder of the trained K, S (and J)")
    parser.add_argument("--output", type=Path, default=HERE.parent / "results" / "composition.json")
    # K's block 2: where a linear probe (trained on the train keys) reads a key's number best on the valid keys;
    # S's block 0: the most of S left after the injection.
    parser.add_argument("--k-layers", nargs="+", default=["2"], help="K's sites: block numbers or module names")
    parser.add_argument("--s-layers", nargs="+", default=["0"], help="S's sites (transformer.drop: the embeddings)")
    parser.add_argument("--steps", type=int, default=600, help="training steps of every trained row")
    parser.add_argument("--lr", type=float, default=1e-3, help="bridges' and router's learning rate")
    parser.add_argument("--ft-lr", type=float, default=3e-4, help="the fine-tuned control's learning rate")
    parser.add_argument("--receiver-steps", type=int, default=2000, help="steps of the two receiver rows")
    parser.add_argument("--receiver-lr", type=float, default=5e-4, help="their learning rate")
    parser.add_argument("--sae-lr", type=float, default=3e-4, help="learning rate of end-to-end SAE training")
    parser.add_argument("--latents", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--sae-steps", type=int, default=400)
    parser.add_argument("--sae-resample-every", type=int, help="the SAEs' train.resample_every (default: the "
                        "library's; 0 for Gemma, whose SAE diverges when dead latents are restarted)")
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument("--speed-repeats", type=int, default=15, help="timed generations per row (the median counts)")
    parser.add_argument("--rows", nargs="*", help="only rows whose name contains one of these")
    parser.add_argument("--choose", action="store_true", help="score the valid keys only (to choose settings)")
    parser.add_argument("--append", action="store_true", help="keep the rows of an earlier --output, replacing those run again")
    parser.add_argument("--speed-only", action="store_true",
                        help="time the rows of an earlier --output again (untrained: the cost is the same), nothing else")
    parser.add_argument("--head-at-answers", action="store_true",
                        help="in training, S's head computes logits only where the loss is taken (the same loss and "
                             "gradients; a third less CPU time per training step with Gemma's 262k-token head)")
    parser.add_argument("--save", action="store_true", help="save every bridge's merged model under RUNS/merges/")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main():
    args = arguments().parse_args()
    torch.manual_seed(args.seed)
    start = time.time()
    bench = Benchmark(args)
    bench.run()
    bench.write(time.time() - start)


if __name__ == "__main__":
    main()
