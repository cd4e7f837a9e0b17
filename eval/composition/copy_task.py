"""The real-model case: S is a pretrained model and its skill is the one it really has, writing a number back into a
sentence (real_skill.py: SmolLM2-135M and Gemma-3-270m copy 100% of numbers, add 16-18%). K, a small model trained
from scratch on S's tokenizer, knows the keys' numbers.

- K reads statements binding keys to numbers, written as usual ("the value of zibor is 37 ."), one to three to a
  row, so that a key may stand anywhere in a row, as it does in the task (after the example shown); never a copy.
- S's skill: "the number is 37 . the number again :" -> 37 (two sentences), after one solved example of the same
  sentence with another number, on the line before.
- The task is that copy with a key where the number was: "the number is zibor . the number again :" -> its number.
  The keys are split as in the toy task (data.py).
"""

from __future__ import annotations

import random
from pathlib import Path

from data import KNOWLEDGE, NUMBERS, Example, Task, encode, stream
from transformers import AutoTokenizer

COPY = ["the number is {a} . the number again :", "write the number {a} . it was"]


class CopyTask(Task):
    # "remember zibor : 37 ." is left out: it would teach K the colon after which the task asks for the number.
    knowledge_templates = [t for t in KNOWLEDGE if ":" not in t]
    rows, seq_len = 16, 36  # a training batch: 576 tokens with SmolLM2's tokenizer (S costs ~1,000x the toy S per token)
    skill_name, title = "copy", "A key's number copied into a sentence (K knows the numbers, S is pretrained)"
    s_does = "copies numbers"

    def __init__(self, skill_model: str | Path, n_keys: int = 1000, seed: int = 0, splits=(0.45, 0.05, 0.5),
                 values: int = 100):
        super().__init__(n_keys, seed, splits, values)
        self._tokenizer = AutoTokenizer.from_pretrained(skill_model)
        # Rows hold the longest example of a sample of each kind (`row` refuses a longer one): 36 for SmolLM2.
        sample = [e for kind in ("knowledge", "skill", "composition") for _, e in zip(range(2000), stream(self, kind, -1))]
        self.seq_len = max(self.seq_len, *(sum(map(len, encode(e, self._tokenizer))) for e in sample))

    def write(self, n: int) -> str:
        return str(n)

    def knowledge(self, rng: random.Random) -> Example:
        """One statement, after none to two others (whole, with their numbers)."""
        before = [Task.knowledge(self, rng).text for _ in range(rng.randrange(3))]
        last = super().knowledge(rng)
        return Example(" ".join(before + [last.prompt]), last.answer, last.key)

    def skill(self, rng: random.Random, a: int | str | None = None) -> Example:
        template = rng.choice(COPY)
        shown = rng.choice(NUMBERS)
        first = rng.choice(NUMBERS) if a is None else a
        value = self.values[first] if isinstance(first, str) else first
        prompt = f"{template.format(a=shown)} {shown} .\n{template.format(a=first)}"
        return Example(prompt, str(value), first if isinstance(first, str) else None)

    def tokenizer(self):
        return self._tokenizer

