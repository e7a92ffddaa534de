"""Sweeps on Hydra's launcher plugins (joblib side by side, submitit locally as on Slurm) against the serial
sweep of Hydra's basic launcher: the same run directories and the same report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fdiv_align.cli import launcher_threads

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
SUBMITIT_SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
TIMING = ("seconds", "seconds_sample", "seconds_score", "seconds_update", "samples_per_second")


@pytest.mark.parametrize("launcher,cores,environ,expected", [
    ({"_target_": JOBLIB, "n_jobs": 2}, 2, {}, 1),
    ({"_target_": JOBLIB, "n_jobs": 2}, 16, {}, 8),
    ({"_target_": JOBLIB, "n_jobs": -1}, 8, {}, 1),     # joblib: -1 = one job per core
    ({"_target_": JOBLIB, "n_jobs": -3}, 8, {}, 1),     # 6 jobs on 8 cores: 1 thread each (8 // 6)
    ({"_target_": JOBLIB, "n_jobs": 64}, 8, {}, 1),     # never fewer than one thread
    ({"_target_": JOBLIB, "n_jobs": 1}, 8, {}, 8),
    ({"_target_": SUBMITIT_LOCAL, "cpus_per_task": 4}, 16, {}, 4),
    ({"_target_": SUBMITIT_LOCAL, "cpus_per_task": None}, 16, {}, 1),
    ({"_target_": SUBMITIT_SLURM, "cpus_per_task": None}, 64, {"SLURM_CPUS_PER_TASK": "6"}, 6),
    ({"_target_": SUBMITIT_SLURM, "cpus_per_task": None}, 64, {}, None),  # Slurm decides; torch sees its cgroup
    ({"_target_": BASIC}, 8, {}, None),
])
def test_launcher_threads_share_the_cores(launcher, cores, environ, expected):
    chosen = launcher_threads(launcher, cores, environ)
    assert (chosen and chosen[0]) == expected


def _sweep(tmp_path, name: str, *launcher_args: str):
    out = tmp_path / name
    res = subprocess.run([sys.executable, "-m", "fdiv_align", "-m", "model=tiny", "trainer=smoke", "task=amazing",
                          "logger.progress=false", "trainer.threads=1", "trainer.seed=0,1", f"hydra.sweep.dir={out}",
                          *launcher_args], capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return out


def _run_dirs(sweep) -> dict:
    return {p.name: p for p in sweep.iterdir() if (p / "summary.json").exists()}


def _strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING and k != "wall_seconds_this_run"}


@pytest.mark.distributed
def test_launcher_sweeps_equal_the_serial_sweep(tmp_path):
    """A 2-run sweep (seeds 0, 1) under joblib (2 jobs side by side) and submitit_local makes the run
    directories of the serial sweep — the same metrics record by record (timings aside), samples, summaries
    and final models — and `fdiv-align-report` prints the same tables for all three."""
    serial = _sweep(tmp_path, "serial")
    others = [_sweep(tmp_path, "joblib", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
              _sweep(tmp_path, "submitit", "hydra/launcher=submitit_local")]
    reference = _run_dirs(serial)
    assert len(reference) == 2

    def report(sweep):
        res = subprocess.run([sys.executable, "-m", "fdiv_align.report", str(sweep)], capture_output=True, text=True,
                             timeout=300, check=True)
        return res.stdout.replace(str(sweep), "<sweep>")

    serial_report = report(serial)
    for sweep in others:
        runs = _run_dirs(sweep)
        assert sorted(runs) == sorted(reference)
        for name, ref in reference.items():
            mine = [_strip(json.loads(line)) for line in (ref / "metrics.jsonl").read_text().splitlines()]
            theirs = [_strip(json.loads(line)) for line in (runs[name] / "metrics.jsonl").read_text().splitlines()]
            assert mine == theirs, name
            assert (ref / "samples.jsonl").read_text() == (runs[name] / "samples.jsonl").read_text()
            a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, runs[name]))
            assert (a["base"], a["final"], a["steps"]) == (b["base"], b["final"], b["steps"])
            assert (ref / "final_model" / "model.safetensors").read_bytes() == \
                (runs[name] / "final_model" / "model.safetensors").read_bytes()
        assert report(sweep) == serial_report
