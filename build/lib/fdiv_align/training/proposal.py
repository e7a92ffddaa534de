"""The off-policy proposal q (GDC++): a frozen copy of the trainable parameters, swapped into the
policy while sampling, and replaced by the current πθ when πθ is estimated closer to p.

Every ``update_every`` steps, the mean over those steps of the importance-sampled estimates of
D(p‖πθ) and D(p‖q) — both on q's samples, ``criterion`` = ``fkl`` (KL(p‖·)) or ``tv``, from
:func:`fdiv_align.objectives.estimators.estimate_divergences` (the trainer passes them) — are
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

    def observe(self, step: int, d_pi: float | None, d_q: float | None) -> dict:
        """Add this step's estimates of D(p‖πθ) and D(p‖q) (None while Z is unknown); at every
        ``update_every``-th step compare their means over the window and, when πθ is closer to p,
        replace q by πθ. Returns the fields of the step's record (``proposal_*``)."""
        if d_pi is not None:
            self.acc["pi"].append(float(d_pi))
            self.acc["q"].append(float(d_q))
        fields = {}
        if step % self.update_every == 0 and self.acc["pi"]:
            mean_pi, mean_q = np.mean(self.acc["pi"]), np.mean(self.acc["q"])
            fields["proposal_d_pi"], fields["proposal_d_q"] = float(mean_pi), float(mean_q)
            if mean_pi < mean_q:
                self.state = self._snapshot()
                self.updates += 1
            self.acc = {"pi": [], "q": []}
        fields["proposal_updates"] = self.updates
        return fields

    def state_dict(self) -> dict:
        return {"state": self.state, "acc": self.acc, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.state, self.acc, self.updates = state["state"], state["acc"], state["updates"]
