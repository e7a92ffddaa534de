"""Hydra entry point: ``fdiv-align`` / ``python -m fdiv_align``.

``fdiv-align`` runs the main job (embedded SmolLM2, ``sentiment``, JS); ``fdiv-align -m
divergence=rkl,fkl,js,tv`` sweeps, one Hydra output directory per run holding its config
(.hydra/), metrics.jsonl, samples.jsonl, checkpoints/ and summary.json.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from .config import register_configs


def _config_dir() -> str:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").exists():
            return str(candidate)
    raise FileNotFoundError(f"no conf/config.yaml next to {here} (install the project with `pip install -e .`)")


def _run(cfg) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from .config import from_dict
    from .trainer import Trainer

    config = from_dict(OmegaConf.to_container(cfg, resolve=True))
    out = config.output_dir or HydraConfig.get().runtime.output_dir
    summary = Trainer(config, output_dir=out).train()
    final = summary.get("final") or {}
    base = summary.get("base") or {}
    if summary.get("status") == "finished":
        print(f"[fdiv-align] {config.divergence.name} on {config.task.name}: alignment {base.get('alignment', float('nan')):.4f} "
              f"(base) -> {final.get('alignment', float('nan')):.4f}; KL(pi||a) {final.get('kl_pi_a', float('nan')):.3f}; "
              f"{summary['wall_seconds_this_run']:.0f}s; run dir {out}")
    else:
        print(f"[fdiv-align] interrupted at step {summary['step']}; checkpoint saved in {out}/checkpoints — rerun the "
              f"same command (or output_dir={out}) to resume", flush=True)
        # end the process with the signal's default action, so that a multirun sweep stops too
        signal.signal(summary["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), summary["signal"])
    return summary


def main() -> None:
    import hydra

    register_configs()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = hydra.main(version_base="1.3", config_path=_config_dir(), config_name="config")(_run)
    app()


if __name__ == "__main__":
    main()
