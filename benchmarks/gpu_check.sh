#!/usr/bin/env bash
# The CUDA path, run for real, in one command (from the repository root, on the GPU machine):
#   (1) the whole pipeline on a tiny random digit model, cpu fp32 vs cuda fp32 and cuda bf16: greedy agreement,
#       entropy max abs difference, gate agreement, training loss, LoRA delta relative difference, eval accuracies
#   (2) kill -9 mid-training on CUDA, rerun, adapter equal to the uninterrupted run; optimizer state placement
#   (3) benchmarks/gpu_scale.sh: Qwen2.5-0.5B and -1.5B shapes, bf16, tok/s against the GPU's bf16 bound
#
#   benchmarks/gpu_check.sh                 # ~3-5 min on one GPU; writes runs/gpu_check.json, runs/gpu_scale.json
#   GPU_PEAK=989 benchmarks/gpu_check.sh    # TFLOP/s when the GPU is not in benchmarks/scale.py's GPU_BF16_TFLOPS
#   DRY=1 benchmarks/gpu_check.sh           # no GPU: (1) and (2) on the CPU (cpu fp32 again, cpu bf16 stand in for
#                                           # the CUDA rows), (3) printed as a plan and run at the smallest shape on
#                                           # the CPU against a nominal 1 TFLOP/s (a check of the script, no GPU figure)
# Needs nothing but the repository and its Python environment: the models are built from configs, random weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
mkdir -p runs
status=0
if [ -n "${DRY:-}" ]; then
  echo "## (1)-(2) agreement and resume, DRY: CPU only"
  "$PY" benchmarks/gpu_check.py --dry --json runs/gpu_check_dry.json || status=$?
  echo; echo "## (3) speed: the measurements benchmarks/gpu_scale.sh would run"
  DRY=1 bash benchmarks/gpu_scale.sh
  echo; echo "## (3) DRY stand-in: smollm2-135m shape, CPU fp32, one thread, against a nominal 1 TFLOP/s (not a GPU bound)"
  "$PY" benchmarks/scale.py --device cpu --dtypes float32 --models smollm2-135m --quick --threads 1 --gpu-peak 1 || status=$?
  exit $status
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "## (1)-(2) agreement and resume"
"$PY" benchmarks/gpu_check.py --json runs/gpu_check.json || status=$?
echo; echo "## (3) speed against the GPU's bf16 bound"
bash benchmarks/gpu_scale.sh || status=$?
exit $status
