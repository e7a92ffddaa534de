#!/usr/bin/env bash
# The device check of issue 27, one command on one GPU (sized for 8 minutes on an H200):
#   1. benchmarks/gpu_check.py: the head log-prob kernel at five shapes (ours, naive, torch.compile(naive),
#      TRL chunked, Liger, Cut Cross-Entropy, the matmul floor; median of 10 fwd+bwd after 3 warm-ups, peak
#      memory, error against fp32) and the f-DPG step against TRL RLOO like for like (LoRA/LoRA, full/full)
#   2. pytest -m gpu (tests/test_gpu.py: the kernels against fp64 on CUDA, the Triton kernel under Inductor,
#      captured decoding against dynamic decoding, the trainer's first step on CUDA against the CPU's)
# Tables and logs go to $OUT (the device tool's folder; default /tmp/gpu_check).
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   here, with pip's registry: the peers and the trainer's
#                                                 dependencies the device image lacks, as Python 3.12 wheels in .whl/
#   bash benchmarks/gpu_check.sh --dry-run        here, on the CPU: every part at toy sizes (checks the script)
#   bash benchmarks/gpu_check.sh                  on the GPU machine (carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."

# what the device image (KINDS.md: torch, transformers, peft, accelerate, tokenizers, pyarrow, … already there) lacks
WHEELS="trl==1.16.0 datasets==4.4.1 dill==0.4.0 multiprocess==0.70.18 hydra-core==1.3.2 omegaconf==2.3.0
gguf==0.17.1 liger-kernel==0.8.5 cut-cross-entropy==25.1.1"
SDISTS="antlr4-python3-runtime==4.9.3"  # pure Python, published as a source archive only: built into a wheel here

if [ "${1:-}" = "--fetch-wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  for w in $WHEELS; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$w" || { echo "no wheel for $w" >&2; exit 1; }
  done
  for s in $SDISTS; do
    python3 -m pip wheel -q --no-deps -w .whl "$s" || { echo "cannot build a wheel of $s" >&2; exit 1; }
  done
  du -sh .whl
  exit 0
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ "${1:-}" = "--dry-run" ]; then
  PYTHON=${PYTHON:-.venv/bin/python}
  "$PYTHON" benchmarks/gpu_check.py --dry-run --out "$OUT/gpu_check.md"
  exit $?
fi

PYTHON=${PYTHON:-python3}
if [ -d .whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"
status=0
timeout 330 "$PYTHON" benchmarks/gpu_check.py --out "$OUT/gpu_check.md" 2>&1 | tee "$OUT/gpu_check.log" || status=1
timeout 120 "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" || status=1
exit $status
