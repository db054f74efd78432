#!/usr/bin/env bash
# GPU check and timings (see benchmarks/gpu.py). On a machine with an NVIDIA GPU and CUDA 13:
#   bash benchmarks/gpu.sh [WHEEL_DIR]
# installs onnxruntime-gpu (from WHEEL_DIR when given, else the package index) into a private
# folder, then runs the correctness check and the timings. Under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
site=${FPN_GPU_SITE:-/tmp/fpn-gpu-site}
if [ -n "${1:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --target "$site" "$1"/onnxruntime_gpu-*.whl
else
  python3 -m pip install -q --no-deps --target "$site" 'onnxruntime-gpu==1.31.1'
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L || true
timeout 420 python3 benchmarks/gpu.py
