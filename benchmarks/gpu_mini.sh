#!/usr/bin/env bash
# Issue 10.4 on the GPU machine: the mini profile for every method, claims and tables, in under 10 minutes
# (benchmarks/gpu_mini.py; docs/gpu.md). Extra arguments go to gpu_mini.py, e.g. --budget 300 --methods jeat standard.
cd "$(dirname "$0")/.." || exit 2
. benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" benchmarks/gpu_mini.py --profile mini --out "${OUT:-results/gpu_run}" "$@"
