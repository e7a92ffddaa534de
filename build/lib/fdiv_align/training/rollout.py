"""The record between making data and computing the loss: one step's (or one evaluation's) samples of q,
scored and gathered once.

The trainer fills it (:meth:`fdiv_align.training.trainer.Trainer.collect_rollout`); the loss, the step's
metrics and the evaluation read only it. Per-sample vectors hold every process's samples in global
order (float64 but ``context_ids``); ``batches`` are this process's part — rows ``shard`` of the
vectors — for the gradient pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lm.batch import Batch

__all__ = ["Rollout"]


@dataclass
class Rollout:
    batches: list[Batch]  # this process's samples, in the order they were drawn
    shard: slice  # their rows in the vectors below
    context_ids: torch.Tensor  # [N] index of each sample's context
    log_q: torch.Tensor  # [N] log q(x|c), recorded while sampling
    log_pi: torch.Tensor  # [N] log πθ(x|c) before the update (= log_q on-policy), no graph
    log_a: torch.Tensor  # [N] log a(x|c), the base
    log_P: torch.Tensor | None  # [N] log P = log a + log Φ (Φ floored by divergence.log_phi_floor); None: not scored
    alignment: torch.Tensor | None  # [N] the task's alignment quantity (b, r or φ); None: not scored
    lengths: torch.Tensor  # [N] generated tokens (EOS included)
    texts: list[str]  # [N] decoded continuations
    context_texts: list[str]  # [N] their contexts
    seconds_sample: float = 0.0  # this process's sampling time
    seconds_score: float = 0.0  # this process's scoring time (log a, log Φ)

    def __len__(self) -> int:
        return self.context_ids.numel()

    @property
    def batch(self) -> Batch:
        """This process's samples when they were drawn in one piece (a training step)."""
        if len(self.batches) != 1:
            raise ValueError(f"this rollout was drawn in {len(self.batches)} pieces; use .batches")
        return self.batches[0]
