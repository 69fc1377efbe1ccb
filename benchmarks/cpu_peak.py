"""How close the JEM chain's passes run to this CPU's fp32 peak (issue 13 item 2; docs/profile_jem.md). Outside CI.

Measures, with one torch thread, CPU time per call:

    gemm       torch.mm of two n x n matrices (fp32 and bf16): the best a dense kernel reaches on one core
    sgld pass  one SGLD step's work on the mini JEM network (WRN-16-2, JEM layout, batch 64, channels_last):
               forward + gradient of the energy w.r.t. the input, `autograd.grad` as the sampler takes it

and prints each as GFLOP/s (FLOPs counted by torch's formulas, `bench.count_flops`). If the chain's rate is
near the GEMM rate, no fp32 rewrite of the same passes can make the step much faster.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/cpu_peak.py [--repeats 5] [--json docs/cpu_peak.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from robust_ebm.bench import count_flops
from robust_ebm.config import load_params
from robust_ebm.energy import marginal_energy
from robust_ebm.models import build_model, place

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def cpu_seconds(fn, repeats: int) -> float:
    """Median CPU time of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def gemm_rate(n: int, dtype: torch.dtype, repeats: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / cpu_seconds(lambda: torch.mm(a, b), repeats) / 1e9


def sgld_pass_rate(batch: int, repeats: int, dtype: torch.dtype) -> tuple[float, float]:
    """(GFLOP/s, CPU s) of one forward + input gradient of E(x) on the mini profile's JEM network."""
    cfg = load_params(PARAMS).profile_config("mini").models["wrn16_2_jem"]
    model = place(build_model(cfg, num_classes=10, in_channels=3, image_size=32), "cpu", True).eval()
    model.requires_grad_(False)
    x0 = torch.rand(batch, 3, 32, 32)

    def step():
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            energy = marginal_energy(model(x)).sum()
        return torch.autograd.grad(energy, x)[0]

    flops = count_flops(step)
    seconds = cpu_seconds(step, repeats)
    return flops / seconds / 1e9, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for n in (1024, 2048):
            rows[f"gemm {n} {name}"] = gemm_rate(n, dtype, args.repeats)
        rate, seconds = sgld_pass_rate(args.batch, args.repeats, dtype)
        rows[f"sgld pass {name}"] = rate
        rows[f"sgld pass {name} seconds"] = seconds
    for key, value in rows.items():
        print(f"{key:28s} {value:8.3f} {'s' if key.endswith('seconds') else 'GFLOP/s'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
            "processor": platform.processor(), "torch": torch.__version__, "threads": 1, "batch": args.batch,
            "gflops_per_s": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
