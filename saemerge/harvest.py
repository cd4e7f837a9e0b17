"""Paired activations, produced on the fly: every source reads the same tokens and runs only up to its own
(last) layer; nothing but a bounded buffer of them is ever in memory."""

from __future__ import annotations

import itertools
from typing import Iterator

import torch

from .activation_cache import ActivationCache, cache_key
from .data import token_batches
from .hooks import run_to_layers
from .recipe import Recipe
from .retokenize import Retokenizer, same_tokenizer
from .sources import load_tokenizer


@torch.no_grad()
def activations(sources: dict, paths: dict[str, list[str]], input_ids: torch.Tensor,
                retokenizers: dict[str, Retokenizer] | None = None) -> list[dict[str, torch.Tensor]]:
    """Per site (position in the layer lists), {name: [tokens, d_model] float32} for one batch of token ids.

    Position 0 of each sequence is left out: its residual norm is an outlier in most models (an attention
    sink) and would dominate the reconstruction loss. A source with a tokenizer of its own (`retokenizers`) reads
    the same text in its tokens, and only the positions where every tokenization ends at the same byte are kept.
    """
    sites = [{} for _ in next(iter(paths.values()))]
    kept, others = aligned_rows(input_ids, retokenizers) if retokenizers else (None, {})
    for name, model in sources.items():
        ids, mask, positions = input_ids, None, kept
        if name in others:  # the source's own tokens, right-padded
            rows, positions = others[name]
            width = max(len(r) for r in rows)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        for site, h in zip(sites, run_to_layers(model, paths[name], ids.to(model.device), mask)):
            site[name] = (h[:, 1:].reshape(-1, h.shape[-1]) if positions is None
                          else torch.cat([h[b, p] for b, p in enumerate(positions)])).float()
    return sites


def aligned_rows(input_ids: torch.Tensor, retokenizers: dict[str, Retokenizer]) -> tuple[list, dict]:
    """The positions kept in each row of the reference tokenization (where it and every other one end at the same
    byte), and {source: (its ids per row, its positions kept in each row)} for the sources in `retokenizers`."""
    kept, others = [], {name: ([], []) for name in retokenizers}
    for row in input_ids.tolist():
        found = {}
        for name, retokenizer in retokenizers.items():
            ids, ours, theirs = retokenizer.pairs(row)
            others[name][0].append(ids)
            found[name] = dict(zip(ours, theirs))
        common = sorted(set.intersection(*(set(f) for f in found.values())))
        kept.append(common)
        for name in retokenizers:
            others[name][1].append([found[name][p] for p in common])
    return kept, others


def shuffled(batches: list[list[dict[str, torch.Tensor]]], seed: int) -> list[list[dict[str, torch.Tensor]]]:
    """The same tokens, pooled across `batches` and dealt back into batches of the same size in a random order
    (one permutation for every site and source: a token's activations stay paired)."""
    sites = [{name: torch.cat([b[site][name] for b in batches]) for name in at_site}
             for site, at_site in enumerate(batches[0])]
    order = torch.randperm(len(next(iter(sites[0].values()))), generator=torch.Generator().manual_seed(seed))
    # As many batches as came in (they differ in size when tokenizations are aligned: see `activations`).
    return [[{name: x[part] for name, x in at_site.items()} for at_site in sites]
            for part in torch.tensor_split(order, len(batches))]


def activation_batches(sources: dict, paths: dict[str, list[str]], tokens: Iterator[torch.Tensor], start: int = 0,
                       shuffle_batches: int = 1, seed: int = 0, rank: int = 0, world: int = 1,
                       cache: ActivationCache | None = None,
                       retokenizers: dict[str, Retokenizer] | None = None) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Endless batches of activations (per site, {source: [tokens, d]}) of the token batches `tokens` yields
    ([sequences, seq_len] each, shared by `world` processes: process `rank` harvests its contiguous slice), from
    batch `start` on.

    Harvested `shuffle_batches` at a time, pooled, shuffled token-wise and dealt out again, so consecutive steps do
    not see the same documents and memory holds one such block whatever the token budget. Batches before `start`
    are skipped by reading `tokens` alone (an exact resume); with a `cache`, batches are read from and written to it.
    """
    read = 0  # token batches taken from `tokens` so far: a cached batch is not tokenized

    def harvest(index: int) -> list[dict[str, torch.Tensor]]:
        nonlocal read
        cached = cache.load(index) if cache else None
        if cached is not None:
            return cached
        for _ in range(index - read):
            next(tokens)
        ids = next(tokens)
        ids = ids[rank * len(ids) // world:(rank + 1) * len(ids) // world]
        read = index + 1
        acts = activations(sources, paths, ids, retokenizers)
        if cache:
            cache.save(index, acts)
        return acts

    block = shuffle_batches
    first_block = start // block
    for b in itertools.count(first_block):
        batches = [harvest(i) for i in range(b * block, (b + 1) * block)]
        if block > 1:
            batches = shuffled(batches, seed * 1_000_003 + b)
        yield from batches[start - b * block if b == first_block else 0:]


def recipe_batches(recipe: Recipe, sources: dict, paths: dict[str, list[str]], tokenizer, batch_size: int,
                   start: int = 0, rank: int = 0, world: int = 1,
                   shuffle: bool = True) -> Iterator[list[dict[str, torch.Tensor]]]:
    """`activation_batches` of the recipe's data mixture, `batch_size` sequences per process, shuffled in blocks of
    `train.shuffle_batches` (`shuffle=False`: one batch at a time, as the token stream gives them), cached in
    `data.cache` if set."""
    tokens = token_batches(recipe.data, tokenizer, batch_size * world, recipe.train.seed)
    cache = ActivationCache(recipe.data.cache, cache_key(recipe, paths, batch_size, rank, world)) \
        if recipe.data.cache else None
    return activation_batches(sources, paths, tokens, start, recipe.train.shuffle_batches if shuffle else 1,
                              recipe.train.seed, rank, world, cache, own_tokenizers(recipe, tokenizer))


def own_tokenizers(recipe: Recipe, tokenizer) -> dict[str, Retokenizer]:
    """{source: a Retokenizer from `tokenizer`} for the sources that read with a tokenizer of their own."""
    return {spec.name: Retokenizer(tokenizer, other) for spec in recipe.models
            if not same_tokenizer(tokenizer, other := load_tokenizer(spec))}
