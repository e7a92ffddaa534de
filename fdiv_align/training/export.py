"""``fdiv-align-export``: a Hugging Face directory (fdiv_align/lm/export.py) from any checkpoint of an f-DPG run.

    fdiv-align-export <run_dir> [--step N] [--merge] [--out DIR]

The run's own config (stored in the checkpoint) rebuilds the base model and its adapters; the
checkpoint's trainable weights are loaded into them and the policy is written as at the end of a run: a
PEFT adapter directory after LoRA (``--merge``: folded into a plain model), else a full model, with the
tokenizer and the generation config. Default output: ``<run_dir>/final_model-step<N>``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..config import from_dict
from ..lm.export import save_final_model
from ..lm.logprobs import SamplingConfig
from ..lm.models import load_configured, resolve_device
from ..lm.policy import prepare_policy
from ..lm.precision import compute_plan
from .checkpoint import checkpoint_step, list_checkpoints, load_sharded, read_checkpoint, verify_checkpoint

__all__ = ["export_checkpoint", "export_trainable", "main"]


def _checkpoint(run_dir: Path, step: int | None) -> tuple[int, Path]:
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint (checkpoints/checkpoint-*): is it an f-DPG run directory?")
    steps = {checkpoint_step(p): p for p in found if verify_checkpoint(p)}
    if not steps:
        raise ValueError(f"every checkpoint in {run_dir / 'checkpoints'} is incomplete or corrupt")
    if step is None:
        step = max(steps)
    if step not in steps:
        raise ValueError(f"{run_dir} has no intact checkpoint of step {step}; it has steps {sorted(steps)}")
    return step, steps[step]


def export_checkpoint(run_dir: str | os.PathLike, step: int | None = None, merge: bool = False,
                      out: str | os.PathLike | None = None, device: str | None = "cpu") -> Path:
    """Write the policy of ``run_dir``'s checkpoint at ``step`` (None: the newest) as a Hugging Face
    directory (see the module docstring); returns its path."""
    run_dir = Path(run_dir)
    step, path = _checkpoint(run_dir, step)
    state = read_checkpoint(path)
    out = Path(out) if out else run_dir / f"final_model-step{step}"
    cfg = from_dict(state["config"])
    if state.get("sharded"):  # an FSDP run's checkpoint: the weights from its shards, whole (DCP)
        return export_trainable(cfg, None, out, merge=merge, device=device, source=str(path), sharded=path)
    return export_trainable(cfg, state["trainable"], out, merge=merge, device=device, source=str(path))


def export_trainable(cfg, trainable: dict[str, torch.Tensor] | None, out: str | os.PathLike, merge: bool = False,
                     device: str | None = "cpu", source: str = "the run", sharded: Path | None = None) -> Path:
    """Rebuild the policy of the run config ``cfg`` (base model and adapters), load its ``trainable``
    weights (whole tensors, by name; or, with ``trainable`` None, those of the sharded checkpoint at
    ``sharded``) and write it as :func:`fdiv_align.lm.export.save_final_model` does."""
    where = resolve_device(device)
    tc = cfg.trainer
    policy = prepare_policy(cfg.model, load_configured(cfg.model, where), where, compute_plan("fp32", False, where, fused=False),
                            SamplingConfig(tc.temperature, tc.top_k, tc.top_p))
    if trainable is None:
        load_sharded(sharded, {"trainable": {n: p.detach() for n, p in policy.trainable.items()}})
    else:
        missing = sorted(set(policy.trainable) - set(trainable))
        if missing:
            raise ValueError(f"{source} lacks trainable weights {missing[:5]} of the model its config builds")
        with torch.no_grad():
            for name, p in policy.trainable.items():
                p.copy_(trainable[name])
    return save_final_model(policy, out, merge=merge)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="fdiv-align-export", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="an f-DPG run directory (with checkpoints/)")
    ap.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest)")
    ap.add_argument("--merge", action="store_true", help="fold LoRA adapters into a plain model")
    ap.add_argument("--out", default=None, help="output directory (default: <run_dir>/final_model-step<N>)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(export_checkpoint(args.run_dir, args.step, args.merge, args.out))


if __name__ == "__main__":
    main()
