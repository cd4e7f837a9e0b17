"""A learned map between two dictionaries: a sparse linear map from A's codes to B's codes, z_b ~ z_a @ W + c.

Trained by Adam on the mean squared error, normalised by the variance of B's codes (so the loss is a fraction of
variance unexplained), plus an L1 penalty on W (`l1` times the summed |W| per row of A, so an identity map costs
`l1`). It answers "how many of B's latents does one latent of A spread over": an identity (or a permutation) is
one weight per row; a latent of A that B splits into two finer ones gives two.

Fit on the first `train_fraction` of the tokens, scored on the rest (later sequences, not seen in training):
  fit          1 - squared error / variance of B's codes around the training mean, on the held-out tokens
  nonzeros     mean number of weights per row with |w| > `threshold`, over the rows of latents that fire in training
  diagonal     sum |W_ii| / sum |W| (aligned SAEs, where latent i of A should map to latent i of B)
Codes come as sparse CSR matrices [tokens, d_sae]; W is dense d_a x d_b (4 MB at 1024 x 1024, 64 MB at 4096^2).
"""

from __future__ import annotations

import warnings

import torch
from tqdm.auto import tqdm

STEPS = 1000
BATCH = 1024
LR = 1e-2
L1 = 0.1
THRESHOLD = 0.01

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def csr_rows(z: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of a CSR matrix, as CSR (torch cannot slice one)."""
    crow = z.crow_indices()
    lo, hi = int(crow[start]), int(crow[stop])
    return torch.sparse_csr_tensor(crow[start:stop + 1] - lo, z.col_indices()[lo:hi], z.values()[lo:hi],
                                   size=(stop - start, z.shape[1]), check_invariants=False)


def stack_csr(parts: list[torch.Tensor]) -> torch.Tensor:
    """CSR matrices with the same columns, one under the other."""
    crows, offset = [torch.zeros(1, dtype=torch.long)], 0
    for p in parts:
        crows.append(p.crow_indices()[1:].long() + offset)
        offset += int(p.crow_indices()[-1])
    return torch.sparse_csr_tensor(torch.cat(crows), torch.cat([p.col_indices().long() for p in parts]),
                                   torch.cat([p.values() for p in parts]),
                                   size=(sum(p.shape[0] for p in parts), parts[0].shape[1]), check_invariants=False)


def permute_rows(z: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Row order[i] of `z` as row i (via COO, which sorts the rows when coalesced)."""
    coo = z.to_sparse_coo().coalesce()
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    rows, cols = coo.indices()
    return torch.sparse_coo_tensor(torch.stack([position[rows], cols]), coo.values(), z.shape,
                                   check_invariants=False).coalesce().to_sparse_csr()


def fit_latent_map(z_a: torch.Tensor, z_b: torch.Tensor, aligned: bool = False, train_fraction: float = 0.8,
                   steps: int = STEPS, batch: int = BATCH, lr: float = LR, l1: float = L1,
                   threshold: float = THRESHOLD, seed: int = 0, progress: bool = True) -> dict:
    """Fit z_b ~ z_a @ W + c (see the module docstring) on CSR codes of the same tokens; returns the numbers and
    the map ("W", a dense tensor, and "fired", the rows of latents that fire in training: for the caller to take
    out before writing JSON)."""
    n = z_a.shape[0]
    split = int(n * train_fraction)
    if split < 1 or split >= n:
        raise ValueError(f"{n} tokens cannot be split {train_fraction:.0%} / {1 - train_fraction:.0%}")
    order = torch.randperm(split, generator=torch.Generator().manual_seed(seed))
    train_a, train_b = (permute_rows(csr_rows(z, 0, split), order) for z in (z_a, z_b))
    mean_b = _column_mean(train_b)
    variance = sum(((csr_rows(train_b, s, min(s + batch, split)).to_dense() - mean_b) ** 2).sum().item()
                   for s in range(0, split, batch)) / split  # per token, summed over B's latents
    W = torch.zeros(z_a.shape[1], z_b.shape[1], requires_grad=True)
    bias = mean_b.clone().requires_grad_(True)
    opt = torch.optim.Adam([W, bias], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)  # to 0: fewer weights left jittering
    fired = torch.bincount(train_a.col_indices(), minlength=z_a.shape[1]) > 0
    start = 0
    with torch.enable_grad():  # callers may hold no_grad
        for _ in tqdm(range(steps), desc="latent map", disable=not progress, leave=False):
            stop = min(start + batch, split)
            x, y = csr_rows(train_a, start, stop), csr_rows(train_b, start, stop).to_dense()
            start = 0 if stop == split else stop
            fvu = ((torch.sparse.mm(x, W) + bias - y) ** 2).sum(1).mean() / variance
            loss = fvu + l1 * W.abs().sum() / max(int(fired.sum()), 1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    W, bias = W.detach(), bias.detach()
    error = total = 0.0
    with torch.no_grad():
        for s in range(split, n, batch):
            x, y = csr_rows(z_a, s, min(s + batch, n)), csr_rows(z_b, s, min(s + batch, n)).to_dense()
            error += ((torch.sparse.mm(x, W) + bias - y) ** 2).sum().item()
            total += ((y - mean_b) ** 2).sum().item()
    big = W.abs() > threshold
    result = {"train_tokens": split, "heldout_tokens": n - split, "steps": steps, "lr": lr, "l1": l1,
              "threshold": threshold, "fit": 1 - error / max(total, 1e-12),
              "nonzeros_per_row": float(big[fired].sum(1).float().mean()) if fired.any() else 0.0,
              "rows": int(fired.sum()), "W": W, "fired": fired}
    if aligned and W.shape[0] == W.shape[1]:
        result["diagonal"] = float(W.diagonal().abs().sum() / W.abs().sum().clamp_min(1e-12))
        result["diagonal_nonzero"] = float(big.diagonal()[fired].float().mean()) if fired.any() else 0.0
    return result


def _column_mean(z: torch.Tensor) -> torch.Tensor:
    return torch.zeros(z.shape[1]).index_add_(0, z.col_indices(), z.values().float()) / z.shape[0]
