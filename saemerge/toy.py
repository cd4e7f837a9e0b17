"""Toy activations built from known sparse features, to check that an SAE finds them (a ground truth for MMCS).

As in Sharkey, Braun and Millidge, "Taking features out of superposition with sparse autoencoders" (LessWrong,
2022): `n_features` random unit directions in `d_in` dimensions (more features than dimensions: superposition);
each sample switches a few of them on, with magnitudes uniform in (0, 1), and adds them up.

- Frequencies follow a power law: feature i (0-based) is on with probability p_i = min(1, c * (i + 1)^-zipf),
  c chosen so that on average `active` features are on per sample.
- Correlation, through a Gaussian copula as in the report, kept simple: features are grouped by index into groups
  of `group` (features 0..group-1, then the next group, ...); feature i is on when
  sqrt(rho) * g_group + sqrt(1 - rho) * e_i < Phi^-1(p_i), with g and e standard normal. Each feature keeps its
  frequency p_i; members of a group fire together more often than chance (rho = `correlation`, 0: independent).
- `noise`: Gaussian noise of that standard deviation per dimension, added to every sample.

`recovery` scores a learned dictionary against the truth with the report's MMCS: each true feature's best cosine
with any learned decoder row, averaged (1: every true feature has a learned twin).

    from saemerge.toy import ToyFeatures, recovery
    toy = ToyFeatures(d_in=32, n_features=64, active=3)
    x = toy.sample(4096, torch.Generator().manual_seed(0))  # [4096, 32]
    recovery(sae, toy)  # {"mmcs": ..., "recovered": fraction of true features with cosine > 0.9, "chance": ...}
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .analyze import _chance_mmcs, _scan, _unit_rows
from .errors import UserError
from .sae import SparseAutoencoder

SEED_OFFSET = 7_919_000
RECOVERED = 0.9  # a true feature counts as recovered when some learned row has cosine above this
_chance = functools.lru_cache(_chance_mmcs)  # deterministic, and asked for again at every logged step


def power_law(n_features: int, active: float, zipf: float) -> torch.Tensor:
    """Probabilities p_i = min(1, c * (i + 1)^-zipf) summing to `active` (c by bisection: the clamp at 1 makes it
    non-linear)."""
    w = torch.arange(1, n_features + 1, dtype=torch.float64) ** -zipf
    lo, hi = 0.0, active / w.min().item()  # at hi every p_i is 1 >= active / n_features
    for _ in range(100):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if (c * w).clamp(max=1).sum() < active else (lo, c)
    return (hi * w).clamp(max=1).float()


class ToyFeatures:
    """A ground-truth dictionary and a sampler of activations from it (see the module docstring)."""

    def __init__(self, d_in: int, n_features: int, active: float = 3.0, zipf: float = 1.0, correlation: float = 0.0,
                 group: int = 4, noise: float = 0.0, seed: int = 0):
        for name, value in (("d_in", d_in), ("n_features", n_features), ("group", group)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{name}: {value!r}; expected a positive integer")
        if not 0 < active <= n_features:
            raise UserError(f"active: {active}; expected a mean number of features on per sample in (0, "
                            f"n_features={n_features}]")
        if not zipf >= 0:
            raise UserError(f"zipf: {zipf}; expected an exponent >= 0 (0: every feature equally frequent)")
        if not 0 <= correlation < 1:
            raise UserError(f"correlation: {correlation}; expected 0 <= correlation < 1")
        if not noise >= 0:
            raise UserError(f"noise: {noise}; expected a standard deviation >= 0")
        self.d_in, self.n_features, self.active, self.zipf = d_in, n_features, active, zipf
        self.correlation, self.group, self.noise, self.seed = correlation, group, noise, seed
        # Its own random stream: an SAE initialised with torch.randn(n, d_in) from the same seed would otherwise
        # start on the true directions (drawn transposed, from seed + an offset).
        g = torch.Generator().manual_seed(seed + SEED_OFFSET)
        self.dictionary = F.normalize(torch.randn(d_in, n_features, generator=g).T, dim=-1)  # [n_features, d_in]
        self.frequencies = power_law(n_features, active, zipf)  # [n_features], summing to `active`
        self.thresholds = torch.special.ndtri(self.frequencies)  # on when the copula's normal falls below

    def sample_codes(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """True codes [n, n_features]: which features are on (see the module docstring), magnitudes uniform(0, 1)."""
        rho = self.correlation
        shared = torch.randn(n, -(-self.n_features // self.group), generator=generator)
        shared = shared.repeat_interleave(self.group, dim=1)[:, : self.n_features]
        normal = rho ** 0.5 * shared + (1 - rho) ** 0.5 * torch.randn(n, self.n_features, generator=generator)
        on = normal < self.thresholds
        return on * torch.rand(n, self.n_features, generator=generator)

    def sample(self, n: int, generator: torch.Generator | None = None, codes: bool = False):
        """Activations x [n, d_in] = codes @ dictionary + noise; with `codes`, (x, codes)."""
        z = self.sample_codes(n, generator)
        x = z @ self.dictionary
        if self.noise:
            x = x + self.noise * torch.randn(n, self.d_in, generator=generator)
        return (x, z) if codes else x


def _rows(dictionary, name: str) -> torch.Tensor:
    if isinstance(dictionary, SparseAutoencoder):
        return _unit_rows(dictionary)
    if isinstance(dictionary, ToyFeatures):
        return dictionary.dictionary
    if isinstance(dictionary, torch.Tensor) and dictionary.dim() == 2:
        return F.normalize(dictionary.detach().float().cpu(), dim=-1)
    raise UserError(f"{name}: {type(dictionary).__name__}; expected a SparseAutoencoder, a ToyFeatures or a "
                    "[rows, d_in] tensor of directions")


def recovery(learned, truth) -> dict:
    """How well `learned` (an SAE, or decoder rows [n, d_in]) recovers `truth` (a ToyFeatures, or directions
    [n_true, d_in]): mmcs = each true direction's best cosine with a learned row, averaged; recovered = the fraction
    of true directions with a best cosine above 0.9; chance = the MMCS random directions would get against as many
    random rows (a floor); best = each true direction's best cosine [n_true]. `truth` may be another learned
    dictionary: then it is the agreement of the two."""
    a, b = _rows(truth, "truth"), _rows(learned, "learned")
    if a.shape[1] != b.shape[1]:
        raise UserError(f"learned: d_in {b.shape[1]}; expected the truth's, {a.shape[1]}")
    (best, _), _ = _scan(a, b, 1)
    best = best[:, 0]
    return {"mmcs": float(best.mean()), "recovered": float((best > RECOVERED).float().mean()),
            "chance": _chance(a.shape[1], len(b)), "best": best}
