#!/usr/bin/env bash
# The scale benchmark on a CUDA GPU: the Qwen2.5-0.5B and -1.5B shapes in bf16, sampling / entropy / training
# tokens/s next to the GPU's bound (2 x params FLOPs per token, 6 x for training, at its dense bf16 peak).
#
#   benchmarks/gpu_scale.sh                 # on the GPU machine, from the repository root (peak: auto-detected)
#   GPU_PEAK=989 benchmarks/gpu_scale.sh    # TFLOP/s when the GPU is not in benchmarks/scale.py's GPU_BF16_TFLOPS
#   DRY=1 benchmarks/gpu_scale.sh           # print the measurements it would run (works without a GPU)
#
# Writes runs/gpu_scale.json; each measurement is its own process (clean peaks; torch.cuda peak in "GPU MB").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
ARGS=(--device cuda --dtypes bfloat16 --models qwen2.5-0.5b,qwen2.5-1.5b
      --batches 1,16,64,256 --new-tokens 64 --completion 512 --gpu-peak "${GPU_PEAK:-auto}")
if [ -n "${DRY:-}" ]; then
  exec "$PY" benchmarks/scale.py "${ARGS[@]}" --dry
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
mkdir -p runs
"$PY" benchmarks/scale.py "${ARGS[@]}" --json runs/gpu_scale.json
