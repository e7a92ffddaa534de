"""The off-policy proposal q (GDC++): a frozen copy of the trainable parameters, swapped into the
policy while sampling, and replaced by the current πθ when πθ is estimated closer to p.

Every ``update_every`` steps, the mean over those steps of the importance-sampled estimates of
D(p‖πθ) and D(p‖q) — both on q's samples, ``criterion`` = ``fkl`` (KL(p‖·)) or ``tv`` — are
compared; q ← πθ when D(p‖πθ) < D(p‖q). On-policy training has no :class:`OffPolicyProposal`.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

__all__ = ["OffPolicyProposal"]


class OffPolicyProposal:
    def __init__(self, trainable: dict[str, torch.Tensor], criterion: str = "fkl", update_every: int = 5):
        if criterion not in ("fkl", "tv"):
            raise ValueError(f"trainer.proposal_criterion must be 'fkl' or 'tv', got {criterion!r}")
        self.trainable, self.criterion, self.update_every = trainable, criterion, update_every
        self.state = self._snapshot()
        self.acc = {"pi": [], "q": []}
        self.updates = 0

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.trainable.items()}

    @contextlib.contextmanager
    def weights(self):
        """Temporarily load q's weights into the trainable parameters (for sampling)."""
        saved = self._snapshot()
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(self.state[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.trainable.items():
                    p.copy_(saved[n])

    def check(self, step: int, log_pi, log_q, log_P, log_z, known, record: dict) -> None:
        """Accumulate this step's estimates; at every ``update_every``-th step compare and maybe swap."""
        if known.any():
            lz = torch.where(known, log_z, torch.zeros_like(log_z))
            log_v = log_P - lz - log_q  # p/q
            v = torch.exp(log_v)
            if self.criterion == "fkl":
                d_pi = torch.where(v > 0, v * (log_P - lz - log_pi), torch.zeros_like(v)).mean()
                d_q = torch.where(v > 0, v * log_v, torch.zeros_like(v)).mean()
            else:
                d_pi = 0.5 * (torch.exp(log_pi - log_q) - v).abs().mean()
                d_q = 0.5 * (1 - v).abs().mean()
            self.acc["pi"].append(float(d_pi))
            self.acc["q"].append(float(d_q))
        if step % self.update_every == 0 and self.acc["pi"]:
            d_pi, d_q = np.mean(self.acc["pi"]), np.mean(self.acc["q"])
            record["proposal_d_pi"], record["proposal_d_q"] = float(d_pi), float(d_q)
            if d_pi < d_q:
                self.state = self._snapshot()
                self.updates += 1
            self.acc = {"pi": [], "q": []}
        record["proposal_updates"] = self.updates

    def state_dict(self) -> dict:
        return {"state": self.state, "acc": self.acc, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.state, self.acc, self.updates = state["state"], state["acc"], state["updates"]
