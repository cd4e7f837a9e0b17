"""A behaviour: prompts, each with a (correct, incorrect) next token; its metric is the mean over prompts of
logit(correct) - logit(incorrect) at the prompt's last token.

Prompts are token ids (the BOS the SAEs were trained with included), right-padded within a batch, so position 0
is every prompt's first token (as `run_features` expects) and padding never reaches a real token (causal
attention). Only each prompt's last position goes through the unembedding (`logits_to_keep` with one position
per row): a 262k vocabulary never makes [batch, seq, vocab] logits.

Built in: `brackets`, from code: positions where the true next token is exactly ")" or "]" and the bracket opened
last (within the prompt's window) is the matching one; correct is the true closer, incorrect the other one.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

CLOSERS = {")": "(", "]": "["}
OPENERS = "([{"


@dataclass
class Behaviour:
    name: str
    prompts: list[list[int]]  # token ids
    correct: list[int]  # a token id per prompt
    incorrect: list[int]
    texts: list[str]  # what each prompt reads, for reports

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices) -> Behaviour:
        pick = lambda items: [items[i] for i in indices]
        return Behaviour(self.name, pick(self.prompts), pick(self.correct), pick(self.incorrect), pick(self.texts))

    def split(self, seed: int = 0, held_out: float = 0.5) -> tuple[Behaviour, Behaviour]:
        """(search, held-out): a shuffle by `seed`, then the first 1 - `held_out` of the prompts search."""
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        cut = len(order) - int(len(order) * held_out)
        return self.subset(order[:cut]), self.subset(order[cut:])

    def batches(self, batch_size: int = 64, pad: int = 0) -> list[PromptBatch]:
        """Right-padded batches, prompts sorted by length so that a batch holds little padding."""
        order = sorted(range(len(self)), key=lambda i: len(self.prompts[i]))
        out = []
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(self.prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(self.prompts[i])] = torch.tensor(self.prompts[i])
                mask[r, :len(self.prompts[i])] = 1
            out.append(PromptBatch(ids, mask, torch.tensor([self.correct[i] for i in rows]),
                                   torch.tensor([self.incorrect[i] for i in rows])))
        return out


@dataclass
class PromptBatch:
    ids: torch.Tensor  # [batch, seq], right-padded
    mask: torch.Tensor  # [batch, seq], 1 on real tokens
    correct: torch.Tensor  # [batch]
    incorrect: torch.Tensor

    @property
    def last(self) -> torch.Tensor:
        """Each prompt's last real position [batch, 1]: the only logits the model computes (`logits_to_keep`)."""
        return self.mask.sum(1, keepdim=True) - 1

    def logit_difference(self, logits: torch.Tensor) -> torch.Tensor:
        """logit(correct) - logit(incorrect) per prompt [batch], from logits [batch, 1, vocab] at `last`."""
        logits = logits[:, 0].float()
        return logits.gather(1, self.correct[:, None])[:, 0] - logits.gather(1, self.incorrect[:, None])[:, 0]


def metric(model, batches: list[PromptBatch]) -> float:
    """The behaviour's metric on the plain model (hooks, if any, stay as they are)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b.ids, attention_mask=b.mask, logits_to_keep=b.last, use_cache=False).logits
            total += float(b.logit_difference(logits).sum())
            count += len(b.ids)
    return total / count


def _one_token(tokenizer, text, where: str) -> int:
    if not isinstance(text, str) or not text:
        raise UserError(f"{where}: {text!r}; expected a non-empty string")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(f"{where}: {text!r} is {len(ids)} tokens; expected a continuation of exactly one token")
    return ids[0]


def load_behaviour(path: str | Path, tokenizer, bos: list[int] = ()) -> Behaviour:
    """A JSON lines file, one prompt a line: {"prompt": ..., "correct": ..., "incorrect": ...}; each continuation
    must be one token of `tokenizer` (e.g. " Paris", with its leading space). `bos` goes before every prompt."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--behaviour: '{path}' is not a file; expected brackets or a .jsonl file of "
                        '{"prompt", "correct", "incorrect"} lines')
    prompts, correct, incorrect, texts = [], [], [], []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"--behaviour: {path.name} line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not JSON ({e.msg}); expected "
                                '{"prompt": ..., "correct": ..., "incorrect": ...}') from None
            if not isinstance(row, dict) or not {"prompt", "correct", "incorrect"} <= row.keys():
                raise UserError(f"{where}: {str(row)[:60]}; expected an object with prompt, correct and incorrect")
            if not isinstance(row["prompt"], str) or not row["prompt"]:
                raise UserError(f"{where}: prompt {row['prompt']!r}; expected a non-empty string")
            good = _one_token(tokenizer, row["correct"], f"{where}: correct")
            bad = _one_token(tokenizer, row["incorrect"], f"{where}: incorrect")
            if good == bad:
                raise UserError(f"{where}: correct and incorrect are the same token; expected two different ones")
            prompts.append(list(bos) + tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
            correct.append(good)
            incorrect.append(bad)
            texts.append(row["prompt"])
    if len(prompts) < 2:
        raise UserError(f"--behaviour: '{path}' holds {len(prompts)} prompts; expected at least 2 (search and "
                        "held-out)")
    return Behaviour(path.stem, prompts, correct, incorrect, texts)


def read_texts(path: str | Path, where: str = "--data") -> list[str]:
    """The "text" field of every line of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{where}: '{path}' is not a file; expected a .jsonl or .jsonl.gz file with a \"text\" field")
    texts = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: {path.name} line {n}: not JSON ({e.msg}); expected one JSON object a "
                                'line with a "text" field') from None
            if isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"]:
                texts.append(row["text"])
    return texts


def bracket_behaviour(texts: list[str], tokenizer, n: int, window: int = 32, bos: list[int] = (),
                      seed: int = 0) -> Behaviour:
    """`n` prompts (half closing ")", half "]" where there are enough of each) of `window` tokens of code, each
    ending where the text's next token is exactly that closer, the bracket opened last being its partner and
    opened inside the window. Brackets inside strings and comments count too (a plain character scan)."""
    closer_ids = {c: tokenizer(c, add_special_tokens=False)["input_ids"] for c in CLOSERS}
    if any(len(ids) != 1 for ids in closer_ids.values()):
        raise UserError("--behaviour brackets: ')' or ']' is not one token of this tokenizer; expected a tokenizer "
                        "with both as single tokens (or pass a .jsonl behaviour)")
    closer_ids = {c: ids[0] for c, ids in closer_ids.items()}
    found = {")": [], "]": []}
    for text in texts:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        stack, scanned = [], 0  # open brackets as (character, index of the token that opened it)
        for i, (start, end) in enumerate(offsets):
            closer = text[start:end]
            if i >= window and closer in CLOSERS and ids[i] == closer_ids[closer] and stack \
                    and stack[-1][0] == CLOSERS[closer] and stack[-1][1] >= i - window:
                found[closer].append((ids[i - window:i], ids[i], closer_ids[")" if closer == "]" else "]"],
                                      text[offsets[i - window][0]:start]))
            for char in text[scanned:end]:
                if char in OPENERS:
                    stack.append((char, i))
                elif char in ")]}" and stack:
                    stack.pop()
            scanned = max(scanned, end)
    rng = random.Random(seed)
    for rows in found.values():
        rng.shuffle(rows)
    half = min(n // 2, len(found["]"]))
    rows = found["]"][:half] + found[")"][:n - half]
    if len(rows) < 2:
        raise UserError(f"--behaviour brackets: found {len(rows)} places in the text where ')' or ']' closes a "
                        f"bracket opened within {window} tokens; expected at least 2 (more code text in --data)")
    rng.shuffle(rows)
    return Behaviour("brackets", [list(bos) + r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                     [r[3] for r in rows])
