"""Calibration: learn how much of each feature to bring in (gates) and whose head to trust (router).

A cheap stage after SAE training: next-token loss on the training mixture, with the sources and SAEs frozen;
only the merged model's gates and router are trained. Their initial values are the identity (gates of 1,
a uniform router), so calibration starts from the plain merge.
"""

from __future__ import annotations

import itertools

import torch
from tqdm.auto import tqdm

from .data import token_batches
from .recipe import Recipe


def train_on_next_token_loss(model, params: list[torch.nn.Parameter], batches, steps: int, lr: float,
                             progress: bool = True, desc: str = "calibrating") -> dict:
    """Train `params` of `model` (everything else frozen) on next-token loss; return the loss curve ends."""
    trainable = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = torch.optim.Adam(params, lr=lr)
    device = next(model.parameters()).device
    losses = []
    bar = tqdm(itertools.islice(batches, steps), total=steps, desc=desc, disable=not progress, unit="step")
    for ids in bar:
        ids = ids.to(device)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.requires_grad_(False)
    window = max(1, min(10, len(losses)))
    return {"steps": steps, "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window}


def calibrate(model, recipe: Recipe, tokenizer, progress: bool = True) -> dict:
    """Train the merged model's gates and router as the recipe says; {} when there is nothing to train."""
    spec = recipe.merge.calibrate
    params = model.calibration_parameters()
    if spec.steps == 0 or not params:
        return {}
    batch_size = max(1, spec.batch_tokens // recipe.data.seq_len)
    # Other seeds than SAE training, so calibration sees the mixture in another order; a batch held back
    # from its own stream measures the effect.
    batches = token_batches(recipe.data, tokenizer, batch_size, recipe.train.seed + 1)
    held_back = next(token_batches(recipe.data, tokenizer, 4 * batch_size, recipe.train.seed + 2))
    before = held_back_loss(model, held_back)
    metrics = train_on_next_token_loss(model, params, batches, spec.steps, spec.lr, progress)
    return {**metrics, "held_back_loss_before": before, "held_back_loss_after": held_back_loss(model, held_back)}


@torch.no_grad()
def held_back_loss(model, ids: torch.Tensor) -> float:
    return model(ids.to(next(model.parameters()).device), labels=ids).loss.item()
