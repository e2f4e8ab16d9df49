#!/usr/bin/env bash
# The GPU path in one command of at most ~10 minutes: CUDA checks and caption-filter throughput at ViT-B/16, 384 px,
# bf16, random weights (benchmarks/gpu_check.py), printed as one table. Uses the project's venv when there is one
# (make install); else the machine's python3 (a GPU image with PyTorch), leaving the Ray pipeline row out when Ray
# is not installed there. Extra arguments go to gpu_check.py (e.g. --batch 128 --size large).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
ARGS=()
"$PY" -c "import ray" 2>/dev/null || ARGS+=(--pipeline-images 0)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 600 "$PY" benchmarks/gpu_check.py "${ARGS[@]}" "$@"
