# Sourced on the GPU machine, from the repository root, by gpu_mini.sh and gpu_bench.sh (docs/gpu.md):
# the packages and data that benchmarks/gpu_prepare.sh put into the carried folder .gpu/.
if [ ! -d .gpu/site ]; then
    echo "gpu_env: no .gpu/site here: run benchmarks/gpu_prepare.sh on the CPU machine and carry .gpu" >&2
    exit 2
fi
export PYTHONPATH="$PWD/.gpu/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export ROBUST_EBM_TRACKING=off MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ ! -d .cache/data/cifar10/train ]; then
    mkdir -p .cache/data && tar -xzf .gpu/cifar10-jpeg.tar.gz -C .cache/data
fi
"$PY" - <<'PYEOF' || exit 2
import platform, torch, pydantic, pyautoattack, torch_fidelity, robust_ebm.cli, robust_ebm.evaluate, robust_ebm.metrics
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA GPU"
print(f"gpu_env: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"pydantic {pydantic.VERSION}, {gpu}", flush=True)
PYEOF
