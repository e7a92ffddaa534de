#!/usr/bin/env bash
# SmolLM2 result tables: the five tasks × rkl, fkl, js × seeds 0,1,2 (TASKS=..., DIVERGENCES=...,
# SEEDS=... to change; tv is left out for the CPU budget, the exact benchmark has it) at CPU scale
# (fdiv_align/conf/trainer/smollm2_sweep.yaml: 20 steps × 16 samples, ≤ 16 new tokens, one final evaluation of
# 256 samples with the target-p row by QRS), plus one steps=0 run per task that evaluates the base
# model once. Extra arguments go to every run (e.g. model.device=cuda WORKERS=1 on a GPU).
# The runs go through Hydra's joblib launcher (pip install 'fdiv_align[sweeps]'): WORKERS jobs side by side
# (default 2), each with cores/WORKERS torch threads (fdiv_align/cli.py launcher_threads). On a cluster, give
# LAUNCHER='hydra/launcher=submitit_slurm hydra.launcher.partition=...' instead.
# Run directories (checkpoints, samples, logs) go to $SWEEP (default runs/smollm2, outside the source tree);
# what the report reads of them (summary, evaluation records, config: `fdiv-align-report --export`) is kept in
# benchmarks/results/smollm2.jsonl, from which docs/results/smollm2.md and its plots are made.
# Resumable: rerunning skips finished runs (summary.json) and resumes unfinished ones from checkpoints.
#   bash benchmarks/smollm2_sweep.sh            # sweep, keep results, report
#   REPORT_ONLY=1 bash benchmarks/smollm2_sweep.sh   # regenerate the report from the kept results
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP=${SWEEP:-runs/smollm2}
RESULTS=benchmarks/results/smollm2.jsonl
TASKS=${TASKS:-amazing,code_compiles,female,science,sentiment}
WORKERS=${WORKERS:-2}
read -r -a LAUNCH <<< "${LAUNCHER:-hydra/launcher=joblib hydra.launcher.n_jobs=$WORKERS}"
COMMON=(trainer=smollm2_sweep
        task.max_new_tokens=16 task.constraint_fit_samples=128 logger.progress=false logger.log_samples=4
        hydra.sweep.dir="$SWEEP" 'hydra.sweep.subdir=${hydra.job.override_dirname}'
        'hydra.job.config.override_dirname.exclude_keys=[trainer,trainer.threads,task.max_new_tokens,task.constraint_fit_samples,logger.progress,logger.log_samples]'
        "${LAUNCH[@]}" "$@")
if [ -z "${REPORT_ONLY:-}" ]; then
  mkdir -p "$SWEEP"
  # the base model's evaluation, once per task (its seed does not matter)
  fdiv-align -m task="$TASKS" divergence=rkl "${COMMON[@]}" trainer.seed=0 trainer.steps=0 trainer.eval_at_start=true \
    > "$SWEEP/base.log" 2>&1
  fdiv-align -m task="$TASKS" divergence="${DIVERGENCES:-rkl,fkl,js}" "trainer.seed=${SEEDS:-0,1,2}" "${COMMON[@]}" \
    > "$SWEEP/sweep.log" 2>&1
  fdiv-align-report "$SWEEP" --export "$RESULTS" > /dev/null
fi
fdiv-align-report "$RESULTS" --title "SmolLM2-135M-Instruct: divergence × task (CPU scale)" \
  --preamble benchmarks/smollm2_notes.md --out docs/results/smollm2.md --plots docs/results/plots/smollm2
