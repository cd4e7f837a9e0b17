"""Paired activations: every source reads the same tokens; each runs only up to its own (last) layer."""

from __future__ import annotations

import torch

from .hooks import run_to_layers


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
