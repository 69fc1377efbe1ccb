#!/usr/bin/env bash
# Issue 13.5 on the GPU machine: `robust-ebm bench` on WRN-28-10 (the JEM family on its own WRN-28-10
# variants) for every method of the paper profile, fp32 and bf16, batch 64 and 128, with model FLOPs, MFU
# and peak memory, after the bf16/TF32-vs-fp32 SGLD check; JSON and log into $OUT (docs/gpu.md). Stopped
# after BENCH_TIMEOUT seconds (default 270: the call's limit is 300); the JSON keeps what was measured.
# --warmup 0: the FLOP-counting step (a full step, untimed) is each method's warm-up; median of 3 timed steps.
cd "$(dirname "$0")/.." || exit 2
. benchmarks/gpu_env.sh
OUT=${OUT:-results/gpu_run}
mkdir -p "$OUT"
set -o pipefail
timeout "${BENCH_TIMEOUT:-270}" "$PY" -m robust_ebm bench --profile paper --model wrn28_10 --batch 64 128 --precision bf16 fp32 --flops \
    --steps 3 --warmup 0 --device cuda --sgld-check --json "$OUT/bench_wrn28_10.json" "$@" 2>&1 \
    | grep --line-buffered -v "class statistics" | tee "$OUT/bench_wrn28_10.log"
rc=$?
if [ "$rc" = 124 ]; then  # the device tool would read 124 as its own time limit
    echo "gpu_bench: stopped after BENCH_TIMEOUT=${BENCH_TIMEOUT:-270} s; the JSON has what was measured (complete: false)"
    exit 3
fi
exit "$rc"
