"""The optional parts of the package and what installs them (TRL's style of extras).

``import fdiv_align`` needs torch alone (the divergences, estimators and losses); the rest comes with an
extra: ``pip install 'fdiv_align[train]'`` for the trainer and the CLI, ``[tasks]`` for the built-in
sentiment task, ``[quant]``, ``[wandb]``, ``[plots]``, ``[trl]``, ``[sweeps]`` (Hydra's joblib and submitit
launchers), or ``[all]``. :func:`require` is called where
a part starts, so that a missing one is an ImportError naming the command that adds it — not a bare
``ModuleNotFoundError`` from deep inside.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "require"]

#: extra → the modules it installs (import names)
EXTRAS = {
    "train": ("transformers", "peft", "accelerate", "hydra", "omegaconf", "tqdm", "yaml", "safetensors"),
    "tasks": ("vaderSentiment",),
    "quant": ("bitsandbytes",),
    "wandb": ("wandb",),
    "plots": ("matplotlib",),
    "trl": ("trl",),
    "sweeps": ("hydra_plugins.hydra_joblib_launcher", "hydra_plugins.hydra_submitit_launcher"),
}


def require(extra: str, what: str) -> None:
    """Raise ImportError naming ``pip install 'fdiv_align[<extra>]'`` when a module of ``extra`` is missing;
    ``what`` names the part that needs it."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; expected one of {', '.join(EXTRAS)}")
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{what} needs {', '.join(missing)}, which this environment lacks: "
                          f"pip install 'fdiv_align[{extra}]'")
