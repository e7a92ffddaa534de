"""Hydra entry points: ``fdiv-align`` / ``python -m fdiv_align``, ``fdiv-align-rm``, ``fdiv-align-po``.

``fdiv-align`` runs the main job (embedded SmolLM2, ``sentiment``, JS); ``fdiv-align -m
divergence=rkl,fkl,js,tv`` sweeps, one Hydra output directory per run holding its config
(.hydra/), metrics.jsonl, samples.jsonl, checkpoints/ and summary.json.
``fdiv-align-rm training.data=prefs.jsonl`` trains a reward model (fdiv_align/conf/reward_model.yaml) and
``fdiv-align-po training.data=prefs.jsonl divergence=js`` runs offline f-DPO (fdiv_align/conf/preference_opt.yaml),
both through fdiv_align/preferences/pair_training.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

from .config import register_configs
from .extras import require
from .files import atomic_path

#: what Hydra and the run directory's lock leave in a run directory before a run writes anything
BEFORE_A_RUN = (".hydra", ".lock")


def _config_dir() -> str:
    """The Hydra configs, shipped inside the package (fdiv_align/conf/), so an installed wheel finds them."""
    conf = Path(__file__).resolve().parent / "conf"
    if not (conf / "config.yaml").exists():
        raise FileNotFoundError(f"no config.yaml in {conf}: the installation of fdiv_align is incomplete (reinstall it)")
    return str(conf)


def _resume_command(out: str, program: str = "fdiv-align") -> str:
    """The command that continues this run (see :func:`resume_command`)."""
    from hydra.core.hydra_config import HydraConfig

    return resume_command(program, list(HydraConfig.get().overrides.task), out)


def hydra_value(text: str) -> str:
    """``text`` as a Hydra override value: as it is where Hydra's grammar reads it unquoted, else quoted."""
    if re.fullmatch(r"[\w./:+~@-]+", text, flags=re.ASCII):
        return text
    # Hydra's quoted strings: a quote is escaped by a backslash; backslashes before a quote or the end doubled
    body = re.sub(r"(\\+)('|$)", lambda m: m.group(1) * 2 + m.group(2), text)
    return "'" + body.replace("'", "\\'") + "'"


def resume_command(program: str, overrides: list[str], out: str) -> str:
    """A shell command that continues a run: ``program`` with the run's Hydra ``overrides`` and ``output_dir``
    pinned to ``out``, each argument quoted for the shell (and the directory for Hydra), so that it works when
    pasted whatever the directory's name holds (spaces, quotes, non-ASCII)."""
    kept = [o for o in overrides if not o.startswith("output_dir=")]
    return " ".join(shlex.quote(arg) for arg in [program, *kept, f"output_dir={hydra_value(out)}"])


def _untouched(run_dir: Path) -> bool:
    """No run has written in ``run_dir``: it holds at most Hydra's config folders, log files and a lock file."""
    return all(p.name.startswith(BEFORE_A_RUN) or p.name.endswith(".log") for p in run_dir.iterdir())


def _remove_if_untouched(run_dir: Path) -> None:
    """A run that failed before writing anything leaves no directory behind (Hydra creates it, with
    its config folder and log file, before the run starts)."""
    if run_dir.is_dir() and _untouched(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)


def _hydra_record(out: str):
    """``on_start`` of a run: Hydra wrote this job's config to ``hydra.output_subdir`` (a pending folder, see
    fdiv_align/conf/config.yaml); now that the run has accepted the directory it becomes ``.hydra/``, replacing
    the record of the same run, and any other pending folder (of a refused or crashed start) goes. Until then a
    refused run — another config, a live run holding the directory — leaves the record of the run there as it was."""
    pending = _pending_record(out)

    def record() -> None:
        if pending is None or not pending.is_dir():
            return
        with atomic_path(pending.parent / ".hydra", directory=True) as tmp:
            for f in pending.iterdir():
                shutil.copy2(f, tmp / f.name)
        for other in pending.parent.glob(".hydra-pending*"):
            shutil.rmtree(other, ignore_errors=True)

    return record


def _pending_record(out: str) -> Path | None:
    """This job's pending config folder (``hydra.output_subdir``); None where Hydra writes ``.hydra/`` itself or
    nothing (a user's own ``hydra.output_subdir``)."""
    from hydra.core.hydra_config import HydraConfig

    subdir = HydraConfig.get().output_subdir
    return Path(out) / subdir if subdir and subdir != ".hydra" else None


def _drop_pending_record(out: str) -> None:
    """This job's pending config folder, if its run never accepted the directory (see :func:`_hydra_record`)."""
    pending = _pending_record(out)
    if pending is not None:
        shutil.rmtree(pending, ignore_errors=True)


def _container(cfg) -> dict:
    """The composed config as plain data; a mandatory value left unset (``???``) is an error naming its key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        raise ValueError(f"config key {exc.full_key} has no value (??? in its YAML): set it on the command line, "
                         f"{exc.full_key}=...") from None


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def launcher_threads(launcher: dict, cores: int, environ=os.environ) -> tuple[int, str] | None:
    """(torch threads per job, why) for jobs that a Hydra launcher runs side by side, so that they do not
    oversubscribe the cores; None when the launcher runs one job at a time (Hydra's basic launcher).

    joblib: ``n_jobs`` jobs at once (joblib's convention: −1 = every core, −k = cores + 1 − k) share the
    cores. submitit: ``cpus_per_task`` (on Slurm also ``SLURM_CPUS_PER_TASK``); the local executor
    without it starts every job at once, so one thread each."""
    target = str(launcher.get("_target_", "")).lower()  # e.g. hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher
    if "joblib" in target:
        n_jobs = int(launcher.get("n_jobs") or -1)
        side_by_side = max(1, min(cores, cores + 1 + n_jobs if n_jobs < 0 else n_jobs))
        return max(1, cores // side_by_side), f"hydra/launcher=joblib runs {side_by_side} jobs side by side on {cores} cores"
    if "submitit" in target:
        cpus = launcher.get("cpus_per_task") or int(environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if cpus:
            return int(cpus), f"submitit: cpus_per_task={cpus}"
        if target.endswith("locallauncher"):
            return 1, "hydra/launcher=submitit_local starts every job at once and names no cpus_per_task"
    return None


def _run(cfg) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .config import from_dict, validate
    from .training.interrupts import RunInterrupted, stop_requests

    hc = HydraConfig.get()
    out = hc.runtime.output_dir
    fresh_dir = _untouched(Path(out))
    try:
        config = from_dict(_container(cfg))
        if hc.mode == RunMode.MULTIRUN and config.output_dir is not None:
            raise ValueError("output_dir names one run directory, but this is a sweep (-m): each run gets its own under "
                             "hydra.sweep.dir; to resume a sweep rerun it with hydra.sweep.dir=<that sweep's directory>")
        if config.output_dir is not None and Path(config.output_dir).resolve() != Path(out).resolve():
            raise RuntimeError(f"output_dir={config.output_dir} but Hydra's run directory is {out}: fdiv_align/conf/config.yaml "
                               "must set hydra.run.dir from output_dir")
        validate(config)
        _set_launcher_threads(config, hc)
        with stop_requests() as stops:
            from .training.trainer import Trainer  # noqa: PLC0415 - heavy (transformers): after the config is known good

            with stops.abortable("model loading"):
                trainer = Trainer(config, output_dir=out, on_start=_hydra_record(out))
            summary = trainer.train()
        late_signal = stops.signum  # a stop that came after the last step (final evaluation): the run finished
    except RunInterrupted as exc:
        print(f"[fdiv-align] interrupted by {signal.Signals(exc.signum).name} during {exc.phase}: no step was taken, "
              f"nothing to save", file=sys.stderr, flush=True)
        if fresh_dir:
            _remove_if_untouched(Path(out))
        _exit_by_signal(exc.signum)
    except BaseException:
        if fresh_dir:
            _remove_if_untouched(Path(out))
        raise
    finally:
        _drop_pending_record(out)
    final = summary.get("final") or {}
    base = summary.get("base") or {}
    if summary.get("status") == "finished":
        if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not one per process
            print(f"[fdiv-align] {config.divergence.name} on {config.task.name}: alignment {_fmt(base.get('alignment'))} "
                  f"(base) -> {_fmt(final.get('alignment'))}; KL(pi||a) {_fmt(final.get('kl_pi_a'), 3)}; "
                  f"{summary['wall_seconds_this_run']:.0f}s; run dir {out}")
        if late_signal is not None:  # the run is complete, but the user asked to stop: a sweep must not go on
            print(f"[fdiv-align] {signal.Signals(late_signal).name} arrived after the last step: this run finished and "
                  f"was saved; stopping here", file=sys.stderr, flush=True)
            _exit_by_signal(late_signal)
        return summary
    if summary.get("saved"):
        print(f"[fdiv-align] interrupted at step {summary['step']}; checkpoint saved in {out}/checkpoints. "
              f"To resume, run:\n  {_resume_command(out)}", file=sys.stderr, flush=True)
    elif fresh_dir:
        _remove_if_untouched(Path(out))
    _exit_by_signal(summary["signal"])


def _set_launcher_threads(config, hc) -> None:
    """``trainer.threads`` null under a launcher that runs jobs side by side: torch threads as
    :func:`launcher_threads` says (an explicit ``trainer.threads`` wins)."""
    from omegaconf import OmegaConf

    if config.trainer.threads is not None:
        return
    chosen = launcher_threads(OmegaConf.to_container(hc.launcher, resolve=True), available_cores())
    if chosen is not None:
        import torch

        torch.set_num_threads(chosen[0])
        print(f"[fdiv-align] {chosen[0]} torch thread(s) per job: {chosen[1]} (trainer.threads=N to choose)", flush=True)


def _fmt(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _exit_by_signal(signum: int) -> None:
    """End the process with the signal's default action (status 128 + signal), so that a multirun
    sweep stops too."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    sys.exit(128 + signum)


def _pair_run(schema, runner, program: str, describe):
    """The Hydra task function of a pair-training entry point (``fdiv-align-rm`` / ``fdiv-align-po``)."""

    def run(cfg) -> dict:
        from hydra.core.hydra_config import HydraConfig

        from .config import from_dict

        out = HydraConfig.get().runtime.output_dir
        config = from_dict(_container(cfg), schema)
        try:
            summary = runner(config, out, on_start=_hydra_record(out))
        finally:
            _drop_pending_record(out)
        if summary["status"] == "interrupted":
            if summary["saved"]:
                print(f"[{describe(config)}] interrupted at step {summary['step']}; checkpoint saved in {out}/checkpoints. "
                      f"To resume, run:\n  {_resume_command(out, program)}", file=sys.stderr, flush=True)
            else:
                _remove_if_untouched(Path(out))
            _exit_by_signal(summary["signal"])
        final, initial = summary["final"], summary["initial"]
        start = f"{initial['heldout_accuracy']:.3f} -> " if initial else ""
        print(f"[{describe(config)}] held-out pairwise accuracy {start}"
              f"{final['heldout_accuracy']:.3f} ± {final['heldout_accuracy_se']:.3f} on {final['heldout_pairs']} pairs; "
              f"{summary['wall_seconds_this_run']:.0f}s; run dir {out}", flush=True)
        return summary

    return run


def _hydra_main(config_name: str, task_function) -> None:
    require("train", "the fdiv-align command line")
    for arg in sys.argv[1:]:
        if arg.startswith("hydra/launcher=") and arg.split("=", 1)[1] != "basic":
            require("sweeps", arg)
    import hydra

    register_configs()
    from omegaconf import OmegaConf

    # fdiv_align/conf/*.yaml: hydra.run.dir = output_dir when set, else a new timestamped directory
    OmegaConf.register_new_resolver("fdiv_or", lambda value, default: default if value is None else value, replace=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hydra.main(version_base="1.3", config_path=_config_dir(), config_name=config_name)(task_function)()


def main() -> None:
    _hydra_main("config", _run)


def rm_main() -> None:
    """``fdiv-align-rm``: a Bradley–Terry reward model on preference pairs (fdiv_align/conf/reward_model.yaml)."""
    from .config import RewardModelConfig
    from .preferences.pair_training import run_reward_model

    _hydra_main("reward_model", _pair_run(RewardModelConfig, run_reward_model, "fdiv-align-rm", lambda c: "fdiv-align-rm"))


def po_main() -> None:
    """``fdiv-align-po``: offline f-DPO on preference pairs (fdiv_align/conf/preference_opt.yaml)."""
    from .config import PreferenceOptConfig
    from .preferences.pair_training import run_preference_opt

    _hydra_main("preference_opt", _pair_run(PreferenceOptConfig, run_preference_opt, "fdiv-align-po",
                                            lambda c: f"fdiv-align-po {c.divergence.name} β={c.beta}"))


if __name__ == "__main__":
    main()
