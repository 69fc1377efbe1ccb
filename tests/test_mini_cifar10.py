"""The mini experiment on real CIFAR-10 through the real workflow (slow: about 25 CPU-minutes from scratch).

Snakemake builds `results/mini/eval/cifar10/{standard,pgd_at}/s0.json` in this checkout (a
no-op when they are up to date), then the test reads the evaluate stage's numbers:
PGD-AT must beat standard training by at least 15 points of PGD-20 accuracy (L∞ 8/255,
step 2/255, 20 steps, random start) on the same test images, and AutoAttack must never be
above PGD-20 for the same model by more than the subset's sampling noise.

    pytest -m slow tests/test_mini_cifar10.py
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "results" / "mini" / "eval" / "cifar10"
METHODS = ("standard", "pgd_at")


def _snakemake() -> str:
    exe = shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))
    if not Path(exe).exists():
        pytest.fail("snakemake is not installed: pip install -e '.[dev]'")
    return exe


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
def test_pgd_at_beats_standard_training_by_15_points_under_pgd20(cifar10_root):
    targets = [str((EVAL / m / "s0.json").relative_to(REPO)) for m in METHODS]  # Snakemake wants them relative
    # cifar10_root is <repo>/.cache/data/cifar10, the default data root: no override, which would
    # change the data stage's settings digest and so rerun every stage of an up-to-date profile.
    assert cifar10_root.parent.resolve() == (REPO / ".cache" / "data").resolve()
    subprocess.run([_snakemake(), "--cores", str(os.cpu_count() or 1), *targets, "--config", "profile=mini"],
                   cwd=REPO, check=True)
    cols = {m: json.loads((EVAL / m / "s0.json").read_text())["columns"] for m in METHODS}
    for m in METHODS:
        assert cols[m]["pgd"]["n"] == cols["standard"]["pgd"]["n"], "both models on the same test images"
        assert cols[m]["pgd"]["eps_pixel"] == pytest.approx(8 / 255) and cols[m]["pgd"]["steps"] == 20
        pgd, aa = cols[m]["pgd"]["accuracy"], cols[m]["autoattack"]["accuracy"]
        noise = 3 * math.sqrt(max(pgd * (1 - pgd), 1e-4) / cols[m]["autoattack"]["n"])  # AA runs on a subset
        assert aa <= pgd + noise, f"{m}: AutoAttack {aa:.3f} above PGD-20 {pgd:.3f}"
    gap = cols["pgd_at"]["pgd"]["accuracy"] - cols["standard"]["pgd"]["accuracy"]
    print(f"PGD-20: standard {cols['standard']['pgd']['accuracy']:.3f}, PGD-AT {cols['pgd_at']['pgd']['accuracy']:.3f}, "
          f"gap {100 * gap:.1f} points")
    assert gap >= 0.15
