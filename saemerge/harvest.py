"""Paired activations: every source reads the same tokens; each runs only up to its own (last) layer."""

from __future__ import annotations

from typing import Iterator

import torch

from .data import token_batches
from .hooks import run_to_layers
from .recipe import Recipe


@torch.no_grad()
def activations(sources: dict, paths: dict[str, list[str]], input_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per site (position in the layer lists), {name: [tokens, d_model] float32} for one batch of token ids.

    Position 0 of each sequence is left out: its residual norm is an outlier in most models (an attention
    sink) and would dominate the reconstruction loss.
    """
    sites = [{} for _ in next(iter(paths.values()))]
    for name, model in sources.items():
        for site, hidden in zip(sites, run_to_layers(model, paths[name], input_ids.to(model.device))):
            site[name] = hidden[:, 1:].reshape(-1, hidden.shape[-1]).float()
    return sites


def paired_activations(recipe: Recipe, sources: dict, paths: dict[str, list[str]],
                       tokenizer) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Endless stream of paired activation batches of about `train.batch_tokens` tokens."""
    batch_size = max(1, recipe.train.batch_tokens // recipe.data.seq_len)
    for input_ids in token_batches(recipe.data, tokenizer, batch_size, recipe.train.seed):
        yield activations(sources, paths, input_ids)
