"""Token batches streamed from a weighted mixture of `datasets` sources (never the whole corpus in memory)."""

from __future__ import annotations

from typing import Iterator

import torch
from datasets import interleave_datasets, load_dataset

from .recipe import DataSpec, RecipeError


def open_mixture(spec: DataSpec, seed: int):
    """A shuffled, weighted, streaming mixture yielding {"text": ...}."""
    parts = []
    for i, d in enumerate(spec.datasets):
        where = f"data.datasets.{i}"
        try:
            ds = load_dataset(d.path, d.name, data_files=d.data_files, split=d.split, streaming=True)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RecipeError(f"{where}: cannot open dataset '{d.path}' {d.data_files or ''}: {reason}") from None
        columns = ds.column_names or list(next(iter(ds), {}).keys())
        if d.text_column not in columns:
            raise RecipeError(f"{where}.text_column: '{d.text_column}' is not a column; expected one of {columns}")
        parts.append(ds.select_columns([d.text_column]).rename_column(d.text_column, "text")
                     if d.text_column != "text" else ds.select_columns(["text"]))
    weights = [d.weight for d in spec.datasets]
    probabilities = [w / sum(weights) for w in weights]
    mixed = parts[0] if len(parts) == 1 else interleave_datasets(
        parts, probabilities=probabilities, seed=seed, stopping_strategy="all_exhausted")
    return mixed.shuffle(seed=seed, buffer_size=spec.shuffle_buffer)


def token_batches(spec: DataSpec, tokenizer, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless [batch_size, seq_len] LongTensors of packed documents, each separated by EOS.

    Each sequence starts with BOS when the tokenizer adds one by itself (Llama, Gemma), as the model saw in
    training. Passes over the data again (reshuffled) when it runs out.
    """
    mixture = open_mixture(spec, seed)
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    body = spec.seq_len - 1 if adds_bos else spec.seq_len
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    rows: list[list[int]] = []
    epoch = 0
    while True:
        mixture.set_epoch(epoch)
        produced = False
        for doc in mixture:
            text = doc["text"]
            if not text:
                continue
            buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if eos is not None:
                buffer.append(eos)
            while len(buffer) >= body:
                rows.append(([bos] if adds_bos else []) + buffer[:body])
                del buffer[:body]
                produced = True
                if len(rows) == batch_size:
                    yield torch.tensor(rows, dtype=torch.long)
                    rows = []
        if not produced and epoch == 0:
            raise RecipeError(f"data.datasets: the mixture holds fewer than {body} tokens; expected enough text for one sequence")
        epoch += 1
