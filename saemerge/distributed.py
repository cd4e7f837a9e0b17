"""Data-parallel training across processes: `accelerate launch --multi_gpu --num_processes N -m saemerge merge ...`
(or `torchrun --nproc_per_node N -m saemerge merge ...`).

Every process holds all sources and all SAEs, harvests its own share of each global batch (a contiguous slice of
its sequences) and computes its share of the global loss (sums over its tokens divided by global counts and
variances), so that summing the gradients across processes gives exactly the single-process gradient of the same
global batch. The launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) is all that is needed; NCCL
on GPUs, gloo on CPUs. With one process every function here is the identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group the launcher set up (a no-op when started as one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def device(setting: torch.device) -> torch.device:
    """A process's own GPU when the recipe asks for `cuda` (or auto) and there are several processes."""
    if world() > 1 and setting.type == "cuda" and setting.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return setting


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over processes (differentiable: the result's gradient is passed back unchanged, as each process
    only backpropagates its own share)."""
    if world() == 1:
        return t
    total = t.detach().clone()
    dist.all_reduce(total)
    return t + (total - t.detach())


def any_true(flag: bool) -> bool:
    """True when any process says so (every process must call it)."""
    if world() == 1:
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows, in process order (equal row counts)."""
    if world() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def sum_gradients(params: list[torch.Tensor]) -> None:
    if world() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)


def broadcast(tensors: list[torch.Tensor]) -> None:
    """Process 0's values to every process (in place)."""
    if world() == 1:
        return
    for t in tensors:
        dist.broadcast(t.data, src=0)


def or_masks(mask: torch.Tensor) -> None:
    """In place: true where it is true in any process."""
    if world() > 1:
        as_int = mask.to(torch.int32)
        dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
        mask.copy_(as_int.bool())
