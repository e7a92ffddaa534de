"""Data parallelism for the trainer (``torchrun`` / ``accelerate launch``; gloo on CPU).

Every process draws the same contexts and uniforms and samples its slice of the global batch
(:meth:`Group.shard`; sampling is by inverse CDF from per-row uniforms, so the samples equal one
process's); the per-sample vectors are all-gathered (:meth:`Group.gather`) so that Ẑ, baselines and
metrics are computed on the global batch identically everywhere, and the gradients of the local part
of the surrogate are summed (:meth:`Group.allreduce_grads`). The result equals one process with the
same global batch and seed. Without a process group every method is the identity.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["Group", "process_group"]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class Group:
    """This process's place in the data-parallel group (rank 0 of 1 without one)."""

    def __init__(self):
        dist = _dist()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)

    def shard(self, n: int) -> slice:
        """This process's slice of a global batch of n."""
        per = math.ceil(n / self.world)
        return slice(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks of a per-sample tensor (CPU)."""
        dist = _dist()
        if dist is None:
            return x
        parts = [None] * self.world
        dist.all_gather_object(parts, x.detach().cpu())
        return torch.cat(parts)

    def sum(self, value: float) -> float:
        """Sum of a number over ranks."""
        return value if _dist() is None else float(self.gather(torch.tensor([value], dtype=torch.float64)).sum())

    def gather_list(self, xs: list) -> list:
        dist = _dist()
        if dist is None:
            return xs
        parts = [None] * self.world
        dist.all_gather_object(parts, xs)
        return [x for part in parts for x in part]

    def allreduce_grads(self, params) -> None:
        """Sum the gradients over ranks (each rank's loss is its part of −Σ coefficient·log π / N_global)."""
        dist = _dist()
        if dist is None:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def process_group() -> Group:
    """Initialise the process group when launched by torchrun/accelerate (WORLD_SIZE > 1) and return
    this process's :class:`Group`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _dist() is None:
        from accelerate import PartialState

        PartialState()  # initialises the default process group (gloo on CPU)
    return Group()
