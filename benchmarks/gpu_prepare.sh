#!/usr/bin/env bash
# Fill .gpu/ (ignored by git) with what the GPU machine of the device tool lacks, so that one carried
# path (`carry: [".gpu"]`) is enough there (docs/gpu.md). Run HERE, from any directory, with PyPI reachable:
#   - cifar10-jpeg.tar.gz (the shared data archive; ../shared does not travel)
#   - site/: pydantic, pyautoattack, torch-fidelity and their few missing needs, built for the machine's
#     Python 3.12 (its image has torch, torchvision, numpy, scipy, yaml, tqdm, rich, matplotlib, filelock,
#     torchmetrics, scikit-learn; no mlflow, snakemake or dvc: the scripts turn MLflow logging off)
#   - commit.txt: the commit and whether the tree was dirty (.git does not travel)
# Versions are those of this checkout's own environment ($PYTHON, default .venv/bin/python); GPU_PYTHON_VERSION
# (default 3.12, the machine's) only for a dry run here with another Python.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10-jpeg.tar.gz}
PY=${PYTHON:-.venv/bin/python}
[ -f "$DATA" ] || { echo "gpu_prepare: no data archive at $DATA (give its path as the first argument)" >&2; exit 2; }
rm -rf .gpu
mkdir -p .gpu
cp "$DATA" .gpu/cifar10-jpeg.tar.gz
mapfile -t PINS < <("$PY" - <<'PYEOF'
from importlib.metadata import version
for name in ("pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions",
             "pyautoattack", "torch-fidelity"):
    print(f"{name}=={version(name)}")
PYEOF
)
"$PY" -m pip install -q --target .gpu/site --no-compile --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "${PINS[@]}"
rm -rf .gpu/site/pyautoattack/examples .gpu/site/bin .gpu/site/tests  # 45 MB of example weights: the carry limit is 64 MiB
dirty=false; [ -n "$(git status --porcelain --untracked-files=no)" ] && dirty=true
printf '{"commit": "%s", "dirty": %s, "prepared_utc": "%s"}\n' "$(git rev-parse HEAD)" "$dirty" \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > .gpu/commit.txt
echo "gpu_prepare: ${PINS[*]}"
echo "gpu_prepare: .gpu is $(du -sh .gpu | cut -f1); the working tree that travels must stay under 64 MiB"
