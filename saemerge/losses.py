"""The aligned training loss, for one site (one SAE per source, one shared latent space):

loss = sum over sources of [ FVU(x_s, Dec_s(Enc_s(x_s))) + l1 |z_s|_1 + l2 |z_s|^2 ]
     + align * mean over pairs of (1 - cos(z_s, z_t))
     + cross * mean over ordered pairs of FVU(x_t, Dec_t(z_s))
FVU (fraction of variance unexplained = 1 - explained variance) makes the reconstruction term free of each
model's activation scale, so one set of coefficients fits sources of any width and norm. The penalties and the
alignment term are means over tokens.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from . import distributed
from .recipe import LatentSpec
from .sae import SparseAutoencoder


def fvu(x: torch.Tensor, recon: torch.Tensor, variance: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error over the variance of x; with `variance` given (the global batch's), this process's share."""
    variance = (x - x.mean(0)).pow(2).sum() if variance is None else variance
    return (x - recon).pow(2).sum() / variance.clamp_min(1e-12)


def total_variance(x: torch.Tensor) -> torch.Tensor:
    """sum |x - mean|^2 over the global batch (all processes' tokens), from each process's count, mean and sum."""
    local = (x - x.mean(0)).pow(2).sum()
    if distributed.world() == 1:
        return local
    n = torch.tensor(float(len(x)), device=x.device)
    mean = distributed.all_sum(x.sum(0)) / distributed.all_sum(n)
    return distributed.all_sum(local + n * (x.mean(0) - mean).pow(2).sum())


# Codes in training: TopK as (values, indices) [tokens, k] (sparse products, see sae.TopKEncode), ReLU dense.
def encode(sae: SparseAutoencoder, x: torch.Tensor):
    return sae.encode_topk(x) if sae.cfg.activation == "topk" else sae.encode(x)


def decode(sae: SparseAutoencoder, code) -> torch.Tensor:
    return sae.decode_topk(*code) if isinstance(code, tuple) else sae.decode(code)


def cosine(a, b, eps: float = 1e-8) -> torch.Tensor:
    """Per-token cosine of two codes, dense or (values, indices)."""
    if not isinstance(a, tuple):
        return F.cosine_similarity(a, b, dim=-1, eps=eps)
    (va, ia), (vb, ib) = a, b
    dot = (va[:, :, None] * vb[:, None, :] * (ia[:, :, None] == ib[:, None, :])).sum((1, 2))
    return dot / (va.norm(dim=-1).clamp_min(eps) * vb.norm(dim=-1).clamp_min(eps))


def mark_fired(fired: torch.Tensor, code) -> None:
    """Or into `fired` (a [d_sae] bool) the latents active in `code`."""
    if isinstance(code, tuple):
        fired[code[1][code[0] > 0]] = True
    else:
        fired |= (code > 0).any(0)


def loss_terms(latent: LatentSpec, saes: dict[str, SparseAutoencoder], acts: dict[str, torch.Tensor],
               fired: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """recon, sparsity (l1 + l2), align, cross and their weighted total for one site's activations
    {source: [tokens, d]}; `fired` (a [d_sae] bool) is or-ed with the latents active in any source.
    With several processes, each returns its share: sums over its tokens divided by the global token count
    and variances, so the shares' gradients add up to the gradient of the global batch's loss."""
    codes = {name: encode(saes[name], x) for name, x in acts.items()}
    if fired is not None:
        for code in codes.values():
            mark_fired(fired, code)
    variance = {name: total_variance(x) for name, x in acts.items()}
    first = next(iter(acts.values()))
    tokens = distributed.all_sum(torch.tensor(float(len(first)), device=first.device))
    parts = {key: torch.zeros(()) for key in ("recon", "sparsity", "align", "cross")}
    for name, x in acts.items():
        z = codes[name][0] if isinstance(codes[name], tuple) else codes[name]
        parts["recon"] = parts["recon"] + fvu(x, decode(saes[name], codes[name]), variance[name])
        parts["sparsity"] = parts["sparsity"] + (latent.l1 * z.abs().sum() + latent.l2 * z.pow(2).sum()) / tokens
    names = list(acts)
    if latent.align > 0 and len(names) > 1:  # one source alone: an SAE of its own, nothing to align
        parts["align"] = torch.stack([(1 - cosine(codes[a], codes[b])).sum() / tokens
                                      for a, b in itertools.combinations(names, 2)]).mean()
    if latent.cross > 0 and len(names) > 1:
        parts["cross"] = torch.stack([fvu(acts[b], decode(saes[b], codes[a]), variance[b])
                                      for a, b in itertools.permutations(names, 2)]).mean()
    parts["total"] = parts["recon"] + parts["sparsity"] + latent.align * parts["align"] + latent.cross * parts["cross"]
    return parts
