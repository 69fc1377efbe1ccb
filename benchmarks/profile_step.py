"""Where one training step's time goes (issue 13 item 2; docs/profile_jem.md). Outside CI.

Builds one method of a profile exactly as `robust-ebm bench` does (random data, `train.train_step`)
and splits the wall time of each timed step into phases by timing the calls it makes:

    prepare forward    model forwards inside method.prepare (SGLD/PYLD chain, attack)
    prepare backward   torch.autograd.grad inside method.prepare (input gradients of the chain/attack)
    prepare other      the rest of prepare (buffer draw and write-back, noise, updates, clamps)
    loss forward       model forwards inside method.loss
    loss other         the rest of loss (energies, KL, logging terms)
    loss backward      loss.backward() (parameter gradients)
    optimiser          optimizer.step / SAM's steps
    other              the rest of train_step (zero_grad, autocast, SAM's second loss pass)

`--ops` prints torch.profiler's table of the operators with most self CPU time instead. Timing hooks
add a few microseconds per call. Phases are CPU time of the process (`time.process_time`), which a
loaded machine disturbs far less than wall time; with one thread (the default) it is the step's work.
The wall time per step is reported beside it.

    PYTHONPATH=src python benchmarks/profile_step.py --method jem --steps 5 [--threads 1] [--ops] [--json f]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from robust_ebm import bench, data
from robust_ebm.config import load_params
from robust_ebm.train import build_parts, resolve_precision, train_step

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
CLOCK = time.process_time
PHASES = ("prepare forward", "prepare backward", "prepare other", "loss forward", "loss other", "loss backward",
          "optimiser", "other")


def build(method: str, profile: str, batch: int, seed: int = 0, channels_last: bool | None = None,
          precision: str = "auto"):
    """Model, method, optimiser and one random batch, as `bench.bench_method` builds them (CPU, fp32)."""
    prof = load_params(PARAMS).profile_config(profile)
    cfg, model_cfg = prof.methods[method], prof.models[prof.methods[method].model]
    data_cfg = cfg.data.model_copy(update={"batch_size": batch,
                                           "px_batch_size": batch if cfg.data.px_batch_size is not None else None})
    cfg = cfg.model_copy(update={"data": data_cfg})
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((64, 3, 32, 32), generator=g)
    stats = data.class_stats(images, torch.arange(64) % 10, 10, max_rank=8)
    device = torch.device("cpu")
    extra = {} if channels_last is None else {"channels_last": channels_last}
    model, meth, opt, _ = build_parts(cfg, model_cfg, num_classes=10, image_shape=(3, 32, 32), stats=stats,
                                      device=device, seed=seed, **extra)
    model.train()
    b = bench._random_batch(batch, (3, 32, 32), 10, device, g, meth.needs_px_stream, batch)
    prec = resolve_precision(precision, device, cfg.sampler is not None)
    return lambda: train_step(model, meth, opt, b, epoch=1, precision=prec, device=device), model, meth, opt


class PhaseTimer:
    """Accumulates wall time per phase by wrapping the calls train_step makes (see the module docstring)."""

    def __init__(self, model, method, optimizer):
        self.t = defaultdict(float)
        self.where = None      # 'prepare' or 'loss' while inside one
        self._fwd_start = None
        self._patches = []
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)
        self._wrap(method, "prepare", "prepare")
        self._wrap(method, "loss", "loss")
        for name in ("step", "first_step", "second_step"):
            if hasattr(optimizer, name):
                self._wrap(optimizer, name, "optimiser")
        grad, backward = torch.autograd.grad, torch.Tensor.backward

        def timed_grad(*a, **k):
            tic = CLOCK()
            try:
                return grad(*a, **k)
            finally:
                self.t[f"{self.where or 'other'} backward"] += CLOCK() - tic

        def timed_backward(*a, **k):
            tic = CLOCK()
            try:
                return backward(*a, **k)
            finally:
                self.t["loss backward" if self.where is None else f"{self.where} backward"] += CLOCK() - tic
        torch.autograd.grad, torch.Tensor.backward = timed_grad, timed_backward
        self._restore = lambda: (setattr(torch.autograd, "grad", grad), setattr(torch.Tensor, "backward", backward))

    def _pre(self, module, args):
        if self._fwd_start is None:
            self._fwd_start = CLOCK()

    def _post(self, module, args, out):
        if self._fwd_start is not None:
            self.t[f"{self.where or 'other'} forward"] += CLOCK() - self._fwd_start
            self._fwd_start = None

    def _wrap(self, obj, name, phase):
        original = getattr(obj, name)

        def wrapped(*a, **k):
            outer, tic = self.where, CLOCK()
            self.where = phase if phase in ("prepare", "loss") else outer
            try:
                return original(*a, **k)
            finally:
                self.where = outer
                self.t[f"{phase} total"] += CLOCK() - tic
        setattr(obj, name, wrapped)

    def split(self, total: float) -> dict[str, float]:
        t = self.t
        out = {
            "prepare forward": t["prepare forward"], "prepare backward": t["prepare backward"],
            "prepare other": t["prepare total"] - t["prepare forward"] - t["prepare backward"],
            "loss forward": t["loss forward"],
            "loss other": t["loss total"] - t["loss forward"],
            "loss backward": t["loss backward"], "optimiser": t["optimiser total"],
        }
        out["other"] = total - sum(out.values())
        return out

    def close(self):
        self._restore()


def phases(step, model, method, optimizer, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        step()
    timer = PhaseTimer(model, method, optimizer)
    rows, totals, walls = [], [], []
    for _ in range(steps):
        timer.t.clear()
        tic, wall = CLOCK(), time.perf_counter()
        step()
        total = CLOCK() - tic
        walls.append(time.perf_counter() - wall)
        totals.append(total)
        rows.append(timer.split(total))
    timer.close()
    median = {k: 1000 * statistics.median(r[k] for r in rows) for k in PHASES}
    return {"cpu_ms_per_step": 1000 * statistics.median(totals), "wall_ms_per_step": 1000 * statistics.median(walls),
            "phases_cpu_ms": median}


def ops(step, steps: int, warmup: int, rows: int = 25) -> str:
    for _ in range(warmup):
        step()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="jem")
    ap.add_argument("--profile", default="mini")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--channels-last", type=int, choices=(0, 1), help="build_parts' channels_last (default: its own)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--ops", action="store_true", help="torch.profiler operator table instead of phases")
    ap.add_argument("--json", help="append the phase split as one JSON line to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    step, model, method, optimizer = build(args.method, args.profile, args.batch,
                                           channels_last=None if args.channels_last is None else bool(args.channels_last),
                                           precision=args.precision)
    if args.ops:
        print(ops(step, args.steps, args.warmup))
        return
    result = {"method": args.method, "threads": args.threads, "channels_last": args.channels_last,
              "precision": args.precision,
              "src": str(Path(__import__("robust_ebm").__file__).parents[1]), "batch": args.batch, "steps": args.steps,
              **phases(step, model, method, optimizer, args.steps, args.warmup)}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
