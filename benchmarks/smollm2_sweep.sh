#!/usr/bin/env bash
# SmolLM2 result tables: tasks (default science, sentiment, female, code_compiles; TASKS=... to change)
# × 4 divergences × seeds (default 0,1; SEEDS=... to change), CPU scale (conf/trainer/smollm2_sweep.yaml).
# Run directories (checkpoints, samples, logs) go to $SWEEP (default runs/smollm2, outside the source
# tree); the compact results the report needs (summary.json, metrics.jsonl, .hydra/config.yaml) are
# copied to benchmarks/results/smollm2/, from which docs/results/smollm2.md and its plots are made.
# Resumable: rerunning skips finished runs (summary.json) and resumes unfinished ones from checkpoints.
#   bash benchmarks/smollm2_sweep.sh            # sweep, keep results, report
#   REPORT_ONLY=1 bash benchmarks/smollm2_sweep.sh   # regenerate the report from the kept results
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP=${SWEEP:-runs/smollm2}
RESULTS=benchmarks/results/smollm2
if [ -z "${REPORT_ONLY:-}" ]; then
  fdiv-align -m task=${TASKS:-science,sentiment,female,code_compiles} divergence=rkl,fkl,js,tv trainer=smollm2_sweep \
    trainer.seed=${SEEDS:-0,1} \
    task.max_new_tokens=24 task.constraint_fit_samples=128 logger.progress=false logger.log_samples=4 \
    hydra.sweep.dir="$SWEEP" 'hydra.sweep.subdir=${hydra.job.override_dirname}' \
    'hydra.job.config.override_dirname.exclude_keys=[trainer,task.max_new_tokens,task.constraint_fit_samples,logger.progress,logger.log_samples]'
  for run in "$SWEEP"/*/; do
    [ -f "$run/summary.json" ] || continue
    dest="$RESULTS/$(basename "$run")"
    mkdir -p "$dest/.hydra"
    cp "$run/summary.json" "$run/metrics.jsonl" "$dest/"
    cp "$run/.hydra/config.yaml" "$dest/.hydra/"
  done
fi
fdiv-align-report "$RESULTS" --title "SmolLM2-135M-Instruct: divergence × task (CPU scale)" \
  --out docs/results/smollm2.md --plots docs/results/plots/smollm2
