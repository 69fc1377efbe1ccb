"""`robust-ebm bench`: training images/s and peak memory per method, on random data.

One timed unit is the full training step of `train.train_step` (attack or SGLD
sampling, loss, backward, optimiser step, SAM's second pass), so the number
is what a training run would see. Peak memory is, on CUDA,
`torch.cuda.max_memory_allocated` during the timed steps (tensors only); on
the CPU the peak resident-set size sampled every 5 ms during the timed steps
minus the RSS before them (`cpu_rss_delta`: includes allocator caching, so it
is an upper bound on the tensors' needs).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Mapping

import torch

from . import data
from .methods import Batch
from .models import architecture_name
from .runtime import pick_device
from .train import build_parts, resolve_precision, train_step


def _rss_bytes() -> int | None:
    """Current resident-set size (Linux /proc); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _PeakRSS:
    """Context manager sampling RSS in a thread; `.delta` = peak - start (bytes) or None."""

    def __enter__(self):
        self.start = _rss_bytes()
        self.peak, self._stop = self.start, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            now = _rss_bytes()
            if now is not None and self.peak is not None:
                self.peak = max(self.peak, now)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.delta = None if self.start is None else max(self.peak - self.start, 0)


def _random_batch(n: int, shape, num_classes: int, device, generator, with_px: bool, px_n: int) -> Batch:
    x = torch.rand((n, *shape), generator=generator).to(device)
    y = torch.randint(num_classes, (n,), generator=generator).to(device)
    x_px = torch.rand((px_n, *shape), generator=generator).to(device) if with_px else None
    return Batch(x=x, y=y, x_px=x_px)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_method(name: str, method_cfg, model_cfg, *, batch: int, device, steps: int, warmup: int,
                 num_classes: int = 10, image_shape=(3, 32, 32), precision: str = "auto", seed: int = 0) -> dict:
    """Time `steps` training steps of one method after `warmup` untimed ones; images/s from the median step."""
    device = pick_device(device) if isinstance(device, str) else device
    data_cfg = method_cfg.data.model_copy(update={"batch_size": batch, "px_batch_size": batch
                                                  if method_cfg.data.px_batch_size is not None else None})
    method_cfg = method_cfg.model_copy(update={"data": data_cfg})
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((max(4 * num_classes, 64), *image_shape), generator=g)
    labels = torch.arange(images.shape[0]) % num_classes
    stats = data.class_stats(images, labels, num_classes, max_rank=8)
    model, method, optimizer, _ = build_parts(method_cfg, model_cfg, num_classes=num_classes, image_shape=image_shape,
                                              stats=stats, device=device, seed=seed)
    prec = resolve_precision(precision, device, method_cfg.sampler is not None)
    model.train()
    b = _random_batch(batch, image_shape, num_classes, device, g, method.needs_px_stream, batch)

    def step():
        train_step(model, method, optimizer, b, epoch=1, precision=prec, device=device)

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    with _PeakRSS() as rss:
        for _ in range(steps):
            tic = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - tic)
    seconds = statistics.median(times)  # robust to a step hit by page faults or a busy neighbour
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) - base, "cuda_max_allocated"
    else:
        peak, kind = rss.delta, "cpu_rss_delta"
    return {"method": name, "loss": method_cfg.loss, "images_per_s": batch / seconds,
            "ms_per_step": 1000 * seconds, "ms_per_step_mean": 1000 * statistics.fmean(times),
            "peak_mem_mb": None if peak is None else peak / 2**20,
            "mem_kind": kind, "device": str(device), "precision": prec, "batch": batch, "steps": steps,
            "arch": architecture_name(model_cfg)}


def run_bench(methods: Mapping, model_cfg, batch: int, device="auto", steps: int = 5, warmup: int = 1, **kw) -> list[dict]:
    """Bench every method in `methods` (name -> MethodConfig) on one architecture `model_cfg`.

    A process pays one-time costs on its first steps (allocator growth, oneDNN/cuDNN kernel
    choice) that per-method warm-up does not absorb: the first method measured 40% slower than
    the same step later on a 2-core CPU. So the first method is run once, untimed, before any timing.
    """
    _check(batch, steps, warmup)
    device = pick_device(device) if isinstance(device, str) else device
    if methods:
        name, cfg = next(iter(methods.items()))
        bench_method(name, cfg, model_cfg, batch=batch, device=device, steps=1, warmup=max(warmup, 1), **kw)
    return [bench_method(name, cfg, model_cfg, batch=batch, device=device, steps=steps, warmup=warmup, **kw)
            for name, cfg in methods.items()]


def _check(batch: int, steps: int, warmup: int) -> None:
    if steps < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0, batch >= 1 (got {steps}, {warmup}, {batch})")


def format_bench(rows: list[dict]) -> str:
    """A fixed-width table of bench rows (what `robust-ebm bench` prints)."""
    if not rows:
        return "(no methods)"
    head = f"{'method':<16}{'arch':<16}{'images/s':>10}{'ms/step':>10}{'peak MiB':>10}  {'memory kind':<20} precision"
    lines = [f"bench on {rows[0]['device']}, batch {rows[0]['batch']}, median of {rows[0]['steps']} timed steps, random data",
             head, "-" * len(head)]
    for r in rows:
        mem = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"{r['method']:<16}{r['arch']:<16}{r['images_per_s']:>10.1f}{r['ms_per_step']:>10.1f}{mem:>10}  "
                     f"{r['mem_kind']:<20} {r['precision']}")
    return "\n".join(lines)


__all__ = ["run_bench", "bench_method", "format_bench"]
