"""Token batches streamed from a weighted mixture of `datasets` sources (never the whole corpus in memory).

Weights are over tokens, not documents: each sequence is drawn from one dataset chosen with probability
proportional to its weight, so a 50/50 mixture of short chapters and long source files is 50/50 in tokens.
"""

from __future__ import annotations

import random
from typing import Iterator

import torch
from datasets import load_dataset

from .recipe import DataSpec, DatasetSpec, RecipeError


def open_dataset(d: DatasetSpec, where: str, seed: int, shuffle_buffer: int):
    """One streaming, shuffled dataset yielding {"text": ...}; bad paths and columns are RecipeErrors."""
    try:
        ds = load_dataset(d.path, d.name, data_files=d.data_files, split=d.split, streaming=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"{where}: cannot open dataset '{d.path}' {d.data_files or ''}: {reason}") from None
    columns = ds.column_names or list(next(iter(ds), {}).keys())
    if d.text_column not in columns:
        raise RecipeError(f"{where}.text_column: '{d.text_column}' is not a column; expected one of {columns}")
    ds = ds.select_columns([d.text_column])
    if d.text_column != "text":
        ds = ds.rename_column(d.text_column, "text")
    return ds.shuffle(seed=seed, buffer_size=shuffle_buffer)


def open_mixture(spec: DataSpec, seed: int) -> list:
    """Every dataset of the mixture, opened (checks paths and columns)."""
    return [open_dataset(d, f"data.datasets.{i}", seed, spec.shuffle_buffer) for i, d in enumerate(spec.datasets)]


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
    weights = [d.weight for d in spec.datasets]
    choose = random.Random(seed)
    while True:
        rows = []
        for _ in range(batch_size):
            stream = choose.choices(streams, weights)[0]
            rows.append(([bos] if adds_bos else []) + [next(stream) for _ in range(body)])
        yield torch.tensor(rows, dtype=torch.long)
