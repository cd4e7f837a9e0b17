"""What the report shows of the SAEs, measured on held-back activations, per source and per pair of sources."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Iterable

import torch
import torch.nn.functional as F

from .sae import SparseAutoencoder


class Moments:
    """Running sums for the variance of a stream of [tokens, d] batches (float64)."""

    def __init__(self):
        self.n, self.total, self.squares = 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        self.n += len(x)
        self.total = self.total + x.sum(0)
        self.squares += x.pow(2).sum().item()

    def variance(self) -> float:
        """sum |x - mean|^2 over every token added."""
        return max(self.squares - (self.total.pow(2).sum().item() / self.n), 1e-12)


@torch.no_grad()
def measure(saes: dict[str, SparseAutoencoder], batches: Iterable[dict[str, torch.Tensor]]) -> dict:
    """SAE quality on held-back batches ({source: [tokens, d]} each), batch by batch, so memory does not grow with
    the number of tokens measured:
      explained_variance  1 - squared error / variance around the mean (per source)
      l0                  active latents per token;  dead_fraction: latents active on no token
      cross_explained_variance (a->b)  Dec_b(Enc_a(x_a)) against x_b: how well a's code stands in for b's
      code_cosine, active_jaccard (a->b)  per-token cosine of the codes / |active in both| / |active in either|
    """
    names = list(saes)
    moments = {n: Moments() for n in names}
    errors, sums = defaultdict(float), defaultdict(float)  # squared errors; per-token sums of l0, cosine, Jaccard
    fired = {n: torch.zeros(saes[n].cfg.d_sae, dtype=torch.bool) for n in names}
    for acts in batches:
        codes = {n: saes[n].encode(x) for n, x in acts.items()}
        for n, z in codes.items():
            moments[n].add(acts[n])
            errors[n] += (acts[n] - saes[n].decode(z)).double().pow(2).sum().item()
            sums["l0", n] += (z > 0).sum().item()
            fired[n] |= (z > 0).any(0).cpu()
        for a, b in itertools.permutations(names, 2):
            errors[a, b] += (acts[b] - saes[b].decode(codes[a])).double().pow(2).sum().item()
            sums["cos", a, b] += F.cosine_similarity(codes[a], codes[b], dim=-1, eps=1e-8).sum().item()
            active_a, active_b = codes[a] > 0, codes[b] > 0
            union = (active_a | active_b).sum(-1).clamp_min(1)
            sums["jaccard", a, b] += ((active_a & active_b).sum(-1) / union).sum().item()
    tokens = moments[names[0]].n
    out = {"tokens": tokens, "sources": {}, "pairs": {}}
    for n in names:
        out["sources"][n] = {"explained_variance": 1 - errors[n] / moments[n].variance(),
                             "l0": sums["l0", n] / tokens, "dead_fraction": (~fired[n]).float().mean().item()}
    for a, b in itertools.permutations(names, 2):
        out["pairs"][f"{a}->{b}"] = {
            "cross_explained_variance": 1 - errors[a, b] / moments[b].variance(),
            "code_cosine": sums["cos", a, b] / tokens,
            # The cosine can be carried by a few dense shared latents; the active-set overlap cannot.
            "active_jaccard": sums["jaccard", a, b] / tokens,
        }
    return out
