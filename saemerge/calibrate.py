"""Calibration: train the bridge (how much of each feature to bring in, or the linear / cross-attention maps) and
the router (whose head to trust) on next-token loss, the sources frozen (the target too unless `receiver`).

A cheap stage after SAE training. Every bridge starts as the plain merge or as no exchange (gates of 1, maps of
zero, a uniform router). With `calibrate.saes` the SAE bridge's SAEs are fine-tuned end to end too, their own
reconstruction and alignment losses on the residuals the forward saw kept as regularisers.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
from tqdm.auto import tqdm

from .data import calibration_data, labelled_batches
from .losses import loss_terms
from .recipe import LatentSpec, Recipe


def sae_regulariser(model, latent: LatentSpec) -> Callable[[], torch.Tensor]:
    """The SAE bridge's own losses (reconstruction, sparsity, alignment) on the residuals its last forward saw at
    every site, position 0 left out as in SAE training; sets the bridge to record them."""
    bridge = model.bridge
    bridge.record = True

    def regulariser() -> torch.Tensor:
        total = sum(loss_terms(latent, bridge.saes[site], {n: h[:, 1:].flatten(0, 1).float() for n, h in seen.items()})["total"]
                    for site, seen in enumerate(bridge.seen))
        for seen in bridge.seen:
            seen.clear()
        return total

    return regulariser


def train_on_next_token_loss(model, params: list[torch.nn.Parameter], batches, steps: int, lr: float,
                             progress: bool = True, desc: str = "calibrating",
                             regulariser: Callable[[], torch.Tensor] | None = None, weight: float = 1.0) -> dict:
    """Train `params` of `model` (everything else frozen) on next-token loss, plus `weight` times `regulariser()`
    if given; return the loss curve ends. `batches` yields token ids, or (ids, labels) with -100 where no loss is
    taken (e.g. everything but an answer)."""
    trainable = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = torch.optim.Adam(params, lr=lr)
    device = next(model.parameters()).device
    losses = []
    bar = tqdm(itertools.islice(batches, steps), total=steps, desc=desc, disable=not progress, unit="step")
    for batch in bar:
        ids, labels = batch if isinstance(batch, (tuple, list)) else (batch, batch)
        loss = model(ids.to(device), labels=labels.to(device)).loss
        if regulariser is not None:
            loss = loss + weight * regulariser()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.requires_grad_(False)
    if regulariser is not None:
        model.bridge.record = False
    window = max(1, min(10, len(losses)))
    return {"steps": steps, "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window}


def calibrate(model, recipe: Recipe, tokenizer, progress: bool = True) -> dict:
    """Train the merged model's bridge and router as the recipe says; {} when there is nothing to train."""
    spec = recipe.merge.calibrate
    params = model.calibration_parameters(spec.saes, spec.receiver)
    if spec.steps == 0 or not params:
        return {}
    batch_size = max(1, spec.batch_tokens // recipe.data.seq_len)
    data, where = calibration_data(recipe)
    # Other seeds than SAE training, so calibration sees the mixture in another order; a batch held back
    # from its own stream measures the effect.
    batches = labelled_batches(data, tokenizer, batch_size, recipe.train.seed + 1, where)
    held_back = next(labelled_batches(data, tokenizer, 4 * batch_size, recipe.train.seed + 2, where))
    before = held_back_loss(model, held_back)
    regulariser = sae_regulariser(model, recipe.latent) if spec.saes else None
    metrics = train_on_next_token_loss(model, params, batches, spec.steps, spec.lr, progress,
                                       regulariser=regulariser, weight=spec.regularise)
    return {**metrics, "held_back_loss_before": before, "held_back_loss_after": held_back_loss(model, held_back)}


@torch.no_grad()
def held_back_loss(model, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    device = next(model.parameters()).device
    return model(batch[0].to(device), labels=batch[1].to(device)).loss.item()
