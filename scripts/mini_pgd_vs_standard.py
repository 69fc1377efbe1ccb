"""Mini experiment on real CIFAR-10: standard training vs PGD-AT, `mini` profile, on the CPU.

Trains both methods with the training loop of the package (robust_ebm.train), then
measures clean and PGD-20 accuracy (evaluation.pgd of params.yaml: L-inf, eps 8/255,
step 2/255, random start) on the first --n-test TEST images. Acceptance target:
PGD-AT's PGD-20 accuracy >= standard's + 15 points.

Data: the ImageFolder root <data_root>/cifar10, data_root = env ROBUST_EBM_DATA_ROOT,
else the repository's .cache/data (tests/conftest.py unpacks /work/shared/data's JPEG
copy there). The JPEG copy differs slightly from the official pickles: label results so.

    python scripts/mini_pgd_vs_standard.py [--out .cache/mini_pgd] [--n-test 1000]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from robust_ebm import attacks, config, data
from robust_ebm.evaluate import evaluate_inputs
from robust_ebm.models import load_classifier
from robust_ebm.runtime import atomic_write_json
from robust_ebm.train import train_stage

REPO = Path(__file__).resolve().parents[1]


def test_accuracy(model_path: Path, splits, pgd_cfg, n_test: int, seed: int) -> dict:
    model, _ = load_classifier(model_path)
    model.eval()
    x, y = splits.test.images[:n_test].float().div(255), splits.test.labels[:n_test]
    g = torch.Generator().manual_seed(seed)
    clean = evaluate_inputs(model, x, y, batch_size=250, device=torch.device("cpu"), desc="test clean")
    adv = evaluate_inputs(model, x, y, batch_size=250, device=torch.device("cpu"), desc="test pgd20",
                          transform=lambda xb, yb: attacks.perturb(model, xb, yb, pgd_cfg, generator=g))
    return {"clean": clean["correct"].float().mean().item(), "pgd20": adv["correct"].float().mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--out", default=str(REPO / ".cache" / "mini_pgd"))
    ap.add_argument("--n-test", type=int, default=1000)
    args = ap.parse_args()
    os.environ.setdefault(config.DATA_ROOT_ENV, str(REPO / ".cache" / "data"))
    params = config.load_params(args.params)
    profile = params.profile_config("mini")
    out = Path(args.out)
    data_dir = out / "data"
    if not (data_dir / "splits.pt").exists():
        print(data.prepare_stage(params, "mini", "cifar10", data_dir))
    splits, _ = data.load_prepared(data_dir)

    results = {}
    for method in ("standard", "pgd_at"):
        run = profile.run("cifar10", method, 0).model_copy(update={"device": "cpu"})
        tic = time.perf_counter()
        info = train_stage(run, data_dir, out / method)
        minutes = (time.perf_counter() - tic) / 60
        acc = test_accuracy(out / method / "model.pt", splits, run.evaluation.pgd, args.n_test, seed=0)
        results[method] = {**acc, "train_minutes": minutes, "selected_epoch": info["selected_epoch"],
                           "images_per_s": info["images_per_s"], "val": info["val"]}
        print(f"{method}: clean {acc['clean']:.3f}, PGD-20 {acc['pgd20']:.3f}, train {minutes:.1f} min", flush=True)

    gap = results["pgd_at"]["pgd20"] - results["standard"]["pgd20"]
    results["pgd20_gap_points"] = 100 * gap
    results["passed"] = gap >= 0.15
    results["note"] = (f"mini profile on the CIFAR-10 JPEG copy, first {args.n_test} test images, CPU; "
                       "close to, not equal to, official CIFAR-10 numbers")
    atomic_write_json(out / "results.json", results)
    print(f"\n{'method':<10}{'clean':>8}{'PGD-20':>8}{'minutes':>9}")
    for method in ("standard", "pgd_at"):
        r = results[method]
        print(f"{method:<10}{r['clean']:>8.3f}{r['pgd20']:>8.3f}{r['train_minutes']:>9.1f}")
    print(f"PGD-AT - standard PGD-20 gap: {100 * gap:.1f} points (target >= 15): "
          f"{'PASS' if results['passed'] else 'FAIL'}")


if __name__ == "__main__":
    main()
