"""Token batches streamed from a weighted mixture of `datasets` sources (never the whole corpus in memory).

Weights are over tokens, not documents: each sequence is drawn from one dataset chosen with probability
proportional to its weight, so a 50/50 mixture of short chapters and long source files is 50/50 in tokens.
Text is packed (documents separated by EOS). Prompt-completion data (`prompt_column`) is packed as prompt + text
for the SAEs; for calibration (`labelled_batches`) each row is a sequence of its own with the loss on the text.
"""

from __future__ import annotations

import itertools
import random
from typing import Iterator

import torch
from datasets import load_dataset

from .recipe import DataSpec, DatasetSpec, Recipe, RecipeError

Row = tuple[list[int], list[int]]  # token ids and labels (-100: no loss)


def open_dataset(d: DatasetSpec, where: str, seed: int, shuffle_buffer: int):
    """One streaming, shuffled dataset yielding {"text": ...}; bad paths and columns, no rows and no text are
    RecipeErrors (an empty dataset would otherwise only fail once training asks it for tokens)."""
    what = f"dataset '{d.path}' {d.data_files or ''}".strip()
    if d.prompt_column is not None and d.prompt_column == d.text_column:
        raise RecipeError(f"{where}.prompt_column: '{d.prompt_column}' is the text_column too; expected another column")
    try:
        ds = load_dataset(d.path, d.name, data_files=d.data_files, split=d.split, streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except StopIteration:  # what `datasets` raises for an empty json file
        first = None
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"{where}: cannot open {what}: {reason}") from None
    if first is None:
        raise RecipeError(f"{where}: {what} has no rows; expected rows with a '{d.text_column}' column")
    columns = ds.column_names or list(first)
    for field, column in (("text_column", d.text_column), ("prompt_column", d.prompt_column)):
        if column is not None and column not in columns:
            raise RecipeError(f"{where}.{field}: '{column}' is not a column; expected one of {columns}")
    # Read on only until the first text (the first row, usually); the whole dataset when every text is empty.
    seen, found = 0, False
    try:
        for row in itertools.chain([first], rows):
            seen += 1
            if row[d.text_column]:
                found = True
                break
    except Exception as e:  # a later row that does not parse
        raise RecipeError(f"{where}: cannot read {what}: {str(e).strip().splitlines()[0]}") from None
    if not found:
        raise RecipeError(f"{where}.text_column: '{d.text_column}' is empty in all {seen} rows of {what}; "
                          "expected text to train on")
    names = {d.text_column: "text"} | ({d.prompt_column: "prompt"} if d.prompt_column else {})
    ds = ds.select_columns(list(names)).rename_columns({k: v for k, v in names.items() if k != v})
    return ds.shuffle(seed=seed, buffer_size=shuffle_buffer)


def open_mixture(spec: DataSpec, seed: int, where: str = "data") -> list:
    """Every dataset of the mixture, opened (checks paths, columns and that there is text); a RecipeError lists
    the problems of all of them."""
    datasets, errors = [], []
    for i, d in enumerate(spec.datasets):
        try:
            datasets.append(open_dataset(d, f"{where}.datasets.{i}", seed, spec.shuffle_buffer))
        except RecipeError as e:
            errors += e.lines
    if errors:
        raise RecipeError(errors)
    return datasets


def _packed_rows(dataset, tokenizer, where: str, seq_len: int, bos: list[int]) -> Iterator[Row]:
    """Endless rows of `seq_len` tokens packed from one dataset's documents (prompt + text), separated by EOS and
    reshuffled at every pass; labels are the ids."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    body = seq_len - len(bos)

    def tokens() -> Iterator[int]:
        for epoch in itertools.count():
            dataset.set_epoch(epoch)
            produced = 0
            for doc in dataset:
                if doc["text"]:
                    ids = tokenizer((doc.get("prompt") or "") + doc["text"], add_special_tokens=False)["input_ids"] + eos
                    produced += len(ids)
                    yield from ids
            if produced < body:
                raise RecipeError(f"{where}: holds {produced} tokens; expected at least one sequence ({body})")

    stream = tokens()
    while True:
        ids = bos + [next(stream) for _ in range(body)]
        yield ids, ids


def _example_rows(dataset, tokenizer, where: str, seq_len: int, bos: list[int]) -> Iterator[Row]:
    """Endless rows of one prompt-completion dataset, one example each, right-padded to `seq_len`, the labels on
    the text only. Prompt and text are tokenised together (a BPE tokenizer writes ' 37' after a prompt as it would
    not alone), so the prompt's tokens must be a prefix of the whole."""
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    for epoch in itertools.count():
        dataset.set_epoch(epoch)
        for doc in dataset:
            if not doc["text"]:
                continue
            text = doc["prompt"] or ""
            prompt = bos + tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = bos + tokenizer(text + doc["text"], add_special_tokens=False)["input_ids"]
            if ids[:len(prompt)] != prompt:
                raise RecipeError(f"{where}.prompt_column: the prompt {text[-30:]!r} tokenises differently "
                                  "before its text; expected a prompt that ends where a token ends")
            if len(ids) > seq_len:
                raise RecipeError(f"{where}: a row of {len(ids)} tokens ({text[:30]!r}...); expected at most "
                                  f"data.seq_len ({seq_len}): one row is one sequence")
            padding = seq_len - len(ids)
            yield ids + [pad] * padding, [-100] * len(prompt) + ids[len(prompt):] + [-100] * padding


def _bos(spec: DataSpec, tokenizer) -> list[int]:
    bos = tokenizer.bos_token_id
    if spec.prepend_bos is None:  # as the tokenizer does by itself
        return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []
    if spec.prepend_bos and bos is None:
        raise RecipeError("data.prepend_bos: true, but the tokenizer has no BOS token; expected false")
    return [bos] if spec.prepend_bos else []


def _batches(spec: DataSpec, tokenizer, batch_size: int, seed: int, where: str, labelled: bool):
    bos = _bos(spec, tokenizer)
    streams = [(_example_rows if labelled and d.prompt_column else _packed_rows)(
        ds, tokenizer, f"{where}.datasets.{i}", spec.seq_len, bos)
        for i, (d, ds) in enumerate(zip(spec.datasets, open_mixture(spec, seed, where)))]
    top = max(d.weight for d in spec.datasets)
    weights = [d.weight / top for d in spec.datasets]  # at most 1: huge weights would sum to inf in random.choices
    choose = random.Random(seed)
    while True:
        rows = [next(choose.choices(streams, weights)[0]) for _ in range(batch_size)]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        yield (ids, torch.tensor([r[1] for r in rows], dtype=torch.long)) if labelled else ids


def token_batches(spec: DataSpec, tokenizer, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless [batch_size, seq_len] LongTensors (what the SAEs read); each sequence is packed from one dataset of
    the mixture and starts with BOS as `prepend_bos` says."""
    return _batches(spec, tokenizer, batch_size, seed, "data", labelled=False)


def calibration_data(recipe: Recipe) -> tuple[DataSpec, str]:
    """What calibration reads (`merge.calibrate.datasets` with `data`'s settings, else `data`), and its field."""
    datasets = recipe.merge.calibrate.datasets
    return (recipe.data.model_copy(update={"datasets": datasets}), "merge.calibrate") if datasets else (recipe.data, "data")


def labelled_batches(spec: DataSpec, tokenizer, batch_size: int, seed: int,
                     where: str = "data") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (ids, labels) batches for next-token training: packed text with labels = ids, and prompt-completion
    rows with the loss on the completion only."""
    return _batches(spec, tokenizer, batch_size, seed, where, labelled=True)
