"""The key-value arithmetic task (after CALM, arXiv 2401.02412): data, tokenizer and splits, from one seed.

- K (knowledge) reads statements binding made-up keys to numbers ("the value of zibor is 37 ."); never arithmetic.
- S (skill) reads arithmetic over plain numbers ("37 + 20 = 57 ."); never a key.
- The task is arithmetic over keys ("zibor + 20 = 57 ."). The keys are split: compositions over the `train` keys
  may be used to calibrate or train bridges (`valid` keys choose settings); the `test` keys' compositions appear
  in no training data at all: their numbers exist only in K's statements.

One word-level tokenizer: every key, template word and digit is a token of its own (a number is its digits).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

KNOWLEDGE = ["{k} is {v} .", "the value of {k} is {v} .", "{k} means {v} .", "remember {k} : {v} ."]
# Statements of one digit each: the number's second digit is otherwise recalled only after its first was read,
# and a composition never shows K the first digit (see README: the knowledge must be where the key is).
DIGITS = ["the tens digit of {k} is {t} .", "the units digit of {k} is {u} ."]
SKILL = ["{a} {op} {b} = {c} .", "what is {a} {op} {b} ? {c} .", "compute {a} {op} {b} : {c} ."]
RECALL = "the value of {k} is"  # K's skill check
NUMBERS = range(100)  # the keys' values and the first operand
OPERANDS = (1, 2, 10, 20)  # the second operand: small steps, so S learns exact arithmetic in minutes (see README)
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # the number, e.g. "82" or "- 8" (sign and digits as the tokenizer splits them)
    key: str | None = None

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer} ."


def spaced(n: int) -> str:
    """A number as its tokens: '- 8', '1 2 3'."""
    return ("- " if n < 0 else "") + " ".join(str(abs(n)))


class Task:
    knowledge_templates = KNOWLEDGE
    rows, seq_len = 128, 16  # a training batch: 2,048 tokens; the longest example is 13 tokens
    skill_name, title = "arithmetic", "Arithmetic over keys (K knows the numbers, S adds)"
    s_does = "does arithmetic"

    def __init__(self, n_keys: int = 1000, seed: int = 0, splits=(0.45, 0.05, 0.5), values: int = 100):
        """`values`: the keys' numbers are 0 .. values - 1 (10: one digit, one position, like the key itself)."""
        rng = random.Random(seed)
        words = set()
        while len(words) < n_keys:
            words.add("".join(rng.choice(CONSONANTS if i % 2 == 0 else VOWELS) for i in range(5)))
        self.keys = sorted(words)
        rng.shuffle(self.keys)
        self.values = {k: rng.choice(range(values)) for k in self.keys}
        a, b = round(splits[0] * n_keys), round((splits[0] + splits[1]) * n_keys)
        self.split_keys = {"train": self.keys[:a], "valid": self.keys[a:b], "test": self.keys[b:]}
        self.seed = seed

    # --- the three kinds of text -------------------------------------------------------------------------------
    def knowledge(self, rng: random.Random) -> Example:
        k = rng.choice(self.keys)
        v = self.values[k]
        if rng.random() < 0.25:
            template = rng.choice(DIGITS)
            answer = str(v // 10) if "{t}" in template else str(v % 10)
            return Example(template.format(k=k, t="@", u="@").split(" @")[0], answer, k)
        return Example(rng.choice(self.knowledge_templates).format(k=k, v="@").split(" @")[0], self.write(v), k)

    def write(self, n: int) -> str:
        """A number as the answer holds it (here its tokens: '- 8', '1 2 3')."""
        return spaced(n)

    def skill(self, rng: random.Random, a: int | str | None = None) -> Example:
        """S's skill over a plain number or, when `a` is a key, over its number (the composition)."""
        return self.arithmetic(rng, a)

    def arithmetic(self, rng: random.Random, a: int | str | None = None) -> Example:
        """`a` plus or minus one of OPERANDS, `a` a plain number or, when given, a key. (With any second operand
        of 0-99, a GPT-2 of this size learns the tens digit in minutes and the units digit not in an hour.)"""
        op = rng.choice("+-")
        first = rng.choice(NUMBERS) if a is None else a
        b = rng.choice(OPERANDS)
        value = self.values[first] if isinstance(first, str) else first
        c = value + b if op == "+" else value - b
        template = rng.choice(SKILL)
        prompt = template.format(a=first if isinstance(first, str) else spaced(first), op=op, b=spaced(b), c="@")
        return Example(prompt.split(" @")[0], spaced(c), first if isinstance(first, str) else None)

    def composition(self, rng: random.Random, split: str) -> Example:
        return self.skill(rng, rng.choice(self.split_keys[split]))

    def recall(self, key: str) -> Example:
        return Example(RECALL.format(k=key), self.write(self.values[key]), key)

    # --- evaluation sets (fixed seeds, distinct from every training stream) ------------------------------------
    def eval_set(self, kind: str, n: int) -> list[Example]:
        rng = random.Random(f"{self.seed}-eval-{kind}")
        if kind in ("skill", "arithmetic"):
            return [self.skill(rng) for _ in range(n)]
        if kind == "recall":
            return [self.recall(k) for k in rng.sample(self.keys, min(n, len(self.keys)))]
        # one problem per key of the split, cycling, so every held-out key is asked about
        keys = self.split_keys[kind]
        return [self.skill(rng, keys[i % len(keys)]) for i in range(n)]

    def tokenizer(self) -> PreTrainedTokenizerFast:
        words = {w for t in KNOWLEDGE + DIGITS + SKILL + [RECALL] for w in t.split() if not w.startswith("{")}
        vocab = SPECIAL + [str(d) for d in range(10)] + sorted(words | {"+", "-"}) + self.keys
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(vocab))}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="<pad>")


def encode(example: Example, tokenizer) -> tuple[list[int], list[int]]:
    """(<s> and the prompt's tokens, the answer's tokens and the ' .' ending it), as the whole text tokenises: a
    pretrained S's tokenizer writes ' 37' as ' ', '3', '7', not as '37' alone would be."""
    prompt = [tokenizer.bos_token_id] + tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    text = [tokenizer.bos_token_id] + tokenizer(example.text, add_special_tokens=False)["input_ids"]
    if text[:len(prompt)] != prompt:
        raise ValueError(f"the prompt of {example.text!r} does not tokenise the same alone")
    return prompt, text[len(prompt):]


def row(example: Example, tokenizer, seq_len: int) -> tuple[list[int], list[int]]:
    """One training row: <s>, one example, right-padded to `seq_len`; labels only on the answer and the ' .' ending
    it (the prompt's random keys and operands carry nothing to learn). One example per row, not packed, so a
    prompt always starts at position 1, as every question is asked."""
    prompt, answer = encode(example, tokenizer)
    pad = seq_len - len(prompt) - len(answer)
    if pad < 0:
        raise ValueError(f"{example.text!r} is longer than {seq_len} tokens")
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    return prompt + answer + [pad_id] * pad, [-100] * len(prompt) + answer + [-100] * pad


def batch(examples, tokenizer, size: int, seq_len: int):
    """(ids, labels) of `size` rows of the next examples."""
    import torch

    pairs = [row(next(examples), tokenizer, seq_len) for _ in range(size)]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def batches(task: "Task", kind: str, tokenizer, seed: int, rows: int | None = None):
    """Endless training batches (ids, labels) of one kind of example (see `stream`), `task.rows` rows each unless
    told."""
    examples = stream(task, kind, seed)
    while True:
        yield batch(examples, tokenizer, rows or task.rows, task.seq_len)


def stream(task: Task, kind: str, seed: int):
    """Endless examples of one kind: knowledge, skill, composition (train keys), or joint (all three, equal
    shares)."""
    rng = random.Random(f"{task.seed}-{kind}-{seed}")
    while True:
        pick = rng.choice(["knowledge", "skill", "composition"]) if kind == "joint" else kind
        if pick == "knowledge":
            yield task.knowledge(rng)
        elif pick == "skill":
            yield task.skill(rng)
        else:
            yield task.composition(rng, "train")


def task_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options that make a task: the scripts that share one must be given the same."""
    parser.add_argument("--skill-model", type=str, help="the real-model case (copy_task.py): S is this pretrained "
                        "model (a folder), K the one trained on its tokenizer")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--values", type=int, default=100, help="keys are bound to 0 .. VALUES-1 (10: one digit)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def make_task(args: argparse.Namespace) -> Task:
    if args.skill_model:
        from copy_task import CopyTask  # it builds on this module

        return CopyTask(args.skill_model, args.keys, args.seed, values=args.values)
    return Task(args.keys, args.seed, values=args.values)
