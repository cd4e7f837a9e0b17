"""Token batches streamed from a weighted mixture of `datasets` sources (never the whole corpus in memory).

Weights are over tokens, not documents: each sequence is drawn from one dataset chosen with probability
proportional to its weight, so a 50/50 mixture of short chapters and long source files is 50/50 in tokens.
"""

from __future__ import annotations

import itertools
import random
from typing import Iterator

import torch
from datasets import load_dataset

from .recipe import DataSpec, DatasetSpec, RecipeError


def open_dataset(d: DatasetSpec, where: str, seed: int, shuffle_buffer: int):
    """One streaming, shuffled dataset yielding {"text": ...}; bad paths and columns, no rows and no text are
    RecipeErrors (an empty dataset would otherwise only fail once training asks it for tokens)."""
    what = f"dataset '{d.path}' {d.data_files or ''}".strip()
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
    if d.text_column not in columns:
        raise RecipeError(f"{where}.text_column: '{d.text_column}' is not a column; expected one of {columns}")
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
    ds = ds.select_columns([d.text_column])
    if d.text_column != "text":
        ds = ds.rename_column(d.text_column, "text")
    return ds.shuffle(seed=seed, buffer_size=shuffle_buffer)


def open_mixture(spec: DataSpec, seed: int) -> list:
    """Every dataset of the mixture, opened (checks paths, columns and that there is text); a RecipeError lists
    the problems of all of them."""
    datasets, errors = [], []
    for i, d in enumerate(spec.datasets):
        try:
            datasets.append(open_dataset(d, f"data.datasets.{i}", seed, spec.shuffle_buffer))
        except RecipeError as e:
            errors += e.lines
    if errors:
        raise RecipeError(errors)
    return datasets


def _token_stream(dataset, tokenizer, where: str, min_tokens: int) -> Iterator[int]:
    """Endless tokens of one dataset, documents separated by EOS, reshuffled at every pass."""
    eos = tokenizer.eos_token_id
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        produced = 0
        for doc in dataset:
            if not doc["text"]:
                continue
            ids = tokenizer(doc["text"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            produced += len(ids)
            yield from ids
        if produced < min_tokens:
            raise RecipeError(f"{where}: holds {produced} tokens; expected at least one sequence ({min_tokens})")
        epoch += 1


def token_batches(spec: DataSpec, tokenizer, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless [batch_size, seq_len] LongTensors; each sequence is packed from one dataset of the mixture.

    Each sequence starts with BOS when the tokenizer adds one by itself (Llama, Gemma), as the model saw in
    training.
    """
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    body = spec.seq_len - 1 if adds_bos else spec.seq_len
    streams = [_token_stream(ds, tokenizer, f"data.datasets.{i}", body) for i, ds in enumerate(open_mixture(spec, seed))]
    top = max(d.weight for d in spec.datasets)
    weights = [d.weight / top for d in spec.datasets]  # at most 1: huge weights would sum to inf in random.choices
    choose = random.Random(seed)
    while True:
        rows = []
        for _ in range(batch_size):
            stream = choose.choices(streams, weights)[0]
            rows.append(([bos] if adds_bos else []) + [next(stream) for _ in range(body)])
        yield torch.tensor(rows, dtype=torch.long)
