"""fdiv_align: align language models with preferences by minimising an f-divergence (f-DPG).

Conventions (docs/math.md, "Divergences"): D_f(π‖p) = E_p[f(π/p)], t = π/p; ``rkl`` = KL(π‖p),
``fkl`` = KL(p‖π). The loss :func:`f_dpg_loss` has E[∇loss] = ∇D exactly given the exact log Z.
"""

from .objectives.divergences import Divergence, available_divergences, exact_divergence, get_divergence, register_divergence
from .objectives.estimators import (
    Estimate,
    LogZAccumulator,
    effective_sample_size,
    estimate_divergences,
    get_baseline,
)
from .objectives.loss import FDivergenceLoss, FDPGLossOutput, f_dpg_loss
from .objectives.preference_loss import f_dpo_loss

__version__ = "0.1.0"


def __getattr__(name):
    # the trainer pulls in transformers and peft: imported on first use of ``fdiv_align.Trainer``
    if name in ("Trainer", "Config"):
        from . import config
        from .training import trainer

        return {"Trainer": trainer.Trainer, "Config": config.Config}[name]
    raise AttributeError(f"module 'fdiv_align' has no attribute {name!r}")


__all__ = [
    "Divergence",
    "available_divergences",
    "exact_divergence",
    "get_divergence",
    "register_divergence",
    "Estimate",
    "LogZAccumulator",
    "effective_sample_size",
    "estimate_divergences",
    "get_baseline",
    "FDivergenceLoss",
    "FDPGLossOutput",
    "f_dpg_loss",
    "f_dpo_loss",
    "Trainer",
    "Config",
]
