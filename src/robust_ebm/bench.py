"""`robust-ebm bench`: training images/s, peak memory and model-FLOP utilisation per method, on random data.

One timed unit is the full training step of `train.train_step` (attack or SGLD
sampling, loss, backward, optimiser step, SAM's second pass), so the number
is what a training run would see. Peak memory is, on CUDA,
`torch.cuda.max_memory_allocated` during the timed steps (tensors only); on
the CPU the peak resident-set size sampled every 5 ms during the timed steps
minus the RSS before them (`cpu_rss_delta`: includes allocator caching, so it
is an upper bound on the tensors' needs).

Model FLOPs (`flops=True`): one extra training step under torch's FLOP formulas (`count_flops`) counts the matmul and convolution FLOPs of the whole step (attack or SGLD, forward, backward, SAM's
second pass; elementwise ops are not counted, as in the usual MFU definition). MFU = FLOPs per step /
median step time / the device's dense peak for the step's precision (`PEAK_TFLOPS`; `peak_tflops`
overrides it; unknown devices and the CPU get none).

`sgld_precision_check`: the same SGLD chains (same start, same noise) in fp32, TF32 and bf16 autocast;
the samples' energies, all measured by the model in fp32, must have the same mean and std within `tol`
times the fp32 std, else the verdict is to keep fp32 for sampling.
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
from .train import autocast, build_parts, configure_backends, resolve_precision, train_step

# Dense (no sparsity) peak TFLOP/s per precision of the stage's arithmetic. Source: NVIDIA's H100 Tensor
# Core GPU datasheet (SXM5: BF16 989.4, TF32 494.7, FP32 66.9; PCIe: 756.5, 378, 51.2; the datasheet's
# 1,979 / 989 are with 2:4 sparsity) and H200 datasheet (same compute as H100 SXM). 'fp32' means TF32 off
# (configure_backends), so its peak is the non-tensor FP32 rate; 'tf32' and 'bf16' use the tensor cores.
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM5 (nvidia-smi: 'NVIDIA H100 80GB HBM3')
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
}
PEAK_SOURCE = "NVIDIA H100/H200 datasheets, dense (no sparsity)"


def device_peak(device, precision: str) -> tuple[float | None, str | None]:
    """(peak TFLOP/s, its source) of a CUDA device for 'fp32' | 'tf32' | 'bf16'; (None, None) if unknown."""
    device = torch.device(device)
    return peak_for_name(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else (None, None)


def peak_for_name(name: str, precision: str) -> tuple[float | None, str | None]:
    """`PEAK_TFLOPS` row whose words all occur in the device name (first match: specific names come first)."""
    for key, peaks in PEAK_TFLOPS.items():
        if all(word in name for word in key.split()) and precision in peaks:
            return peaks[precision], f"{key} {precision}: {PEAK_SOURCE}"
    return None, None


def count_flops(step) -> int:
    """Matmul/convolution FLOPs of one call of `step()` (runs the step once).

    torch's own counter formulas (`torch.utils.flop_counter.flop_registry`, those of FlopCounterMode) in a
    bare dispatch mode: FlopCounterMode's per-module tracking hooks fail under `autograd.grad` on a leaf
    input, which every attack and SGLD step takes."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += int(formula(*args, **kwargs, out_val=out))
            return out

    with Count() as counter:
        step()
    return counter.total


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
                 num_classes: int = 10, image_shape=(3, 32, 32), precision: str = "auto", seed: int = 0,
                 flops: bool = False, peak_tflops: float | None = None, model_key: str | None = None,
                 channels_last: bool = False) -> dict:
    """Time `steps` training steps of one method after `warmup` untimed ones; images/s from the median step.
    With `flops`, one more untimed step counts the model FLOPs (module docstring) and MFU is reported.
    `precision` and `channels_last` as the training loop takes them (`training:` in params.yaml)."""
    device = pick_device(device) if isinstance(device, str) else device
    data_cfg = method_cfg.data.model_copy(update={"batch_size": batch, "px_batch_size": batch
                                                  if method_cfg.data.px_batch_size is not None else None})
    method_cfg = method_cfg.model_copy(update={"data": data_cfg})
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((max(4 * num_classes, 64), *image_shape), generator=g)
    labels = torch.arange(images.shape[0]) % num_classes
    stats = data.class_stats(images, labels, num_classes, max_rank=8)
    model, method, optimizer, _ = build_parts(method_cfg, model_cfg, num_classes=num_classes, image_shape=image_shape,
                                              stats=stats, device=device, seed=seed, channels_last=channels_last)
    prec = resolve_precision(precision, device, method_cfg.sampler is not None)
    configure_backends(prec, device, deterministic=False)  # TF32 on for tf32/bf16 only, as the train stage sets it
    model.train()
    b = _random_batch(batch, image_shape, num_classes, device, g, method.needs_px_stream, batch)

    def step():
        train_step(model, method, optimizer, b, epoch=1, precision=prec, device=device)

    for _ in range(warmup):
        step()
    step_flops = count_flops(step) if flops else None
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times, cpu_times = [], []
    with _PeakRSS() as rss:
        for _ in range(steps):
            tic, cpu_tic = time.perf_counter(), time.thread_time()
            step()
            _sync(device)
            times.append(time.perf_counter() - tic)
            cpu_times.append(time.thread_time() - cpu_tic)
    seconds = statistics.median(times)  # robust to a step hit by page faults or a busy neighbour
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) - base, "cuda_max_allocated"
    else:
        peak, kind = rss.delta, "cpu_rss_delta"
    peak_source = "given" if peak_tflops is not None else None
    if peak_tflops is None and flops:
        peak_tflops, peak_source = device_peak(device, prec)
    achieved = None if step_flops is None else step_flops / seconds / 1e12
    return {"method": name, "loss": method_cfg.loss, "images_per_s": batch / seconds,
            "ms_per_step": 1000 * seconds, "ms_per_step_mean": 1000 * statistics.fmean(times),
            "step_ms": [1000 * t for t in times], "step_cpu_ms": [1000 * t for t in cpu_times],
            "peak_mem_mb": None if peak is None else peak / 2**20,
            "mem_kind": kind, "device": str(device), "device_name": _device_name(device), "precision": prec,
            "channels_last": channels_last,
            "batch": batch, "steps": steps, "arch": architecture_name(model_cfg), "model": model_key,
            "flops_per_step": step_flops, "tflops_per_s": achieved, "peak_tflops": peak_tflops,
            "peak_source": peak_source,
            "mfu": None if achieved is None or not peak_tflops else achieved / peak_tflops}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


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
        bench_method(name, cfg, model_cfg, batch=batch, device=device, steps=1, warmup=max(warmup, 1),
                     **{**kw, "flops": False})
    return [bench_method(name, cfg, model_cfg, batch=batch, device=device, steps=steps, warmup=warmup, **kw)
            for name, cfg in methods.items()]


def _check(batch: int, steps: int, warmup: int) -> None:
    if steps < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0, batch >= 1 (got {steps}, {warmup}, {batch})")


def format_bench(rows: list[dict]) -> str:
    """A fixed-width table of bench rows (what `robust-ebm bench` prints)."""
    if not rows:
        return "(no methods)"
    head = (f"{'method':<16}{'arch':<16}{'images/s':>10}{'ms/step':>10}{'peak MiB':>10}{'GFLOP/step':>12}{'TFLOP/s':>9}"
            f"{'MFU':>7}  {'memory kind':<20} precision")
    lines = [f"bench on {rows[0]['device']} ({rows[0].get('device_name', '')}), batch {rows[0]['batch']}, median of "
             f"{rows[0]['steps']} timed steps, random data", head, "-" * len(head)]

    def num(value, fmt, scale=1.0):
        return "n/a" if value is None else format(value * scale, fmt)

    for r in rows:
        lines.append(f"{r['method']:<16}{r['arch']:<16}{r['images_per_s']:>10.1f}{r['ms_per_step']:>10.1f}"
                     f"{num(r['peak_mem_mb'], '.0f'):>10}{num(r.get('flops_per_step'), '.1f', 1e-9):>12}"
                     f"{num(r.get('tflops_per_s'), '.1f'):>9}{num(r.get('mfu'), '.1%'):>7}  "
                     f"{r['mem_kind']:<20} {r['precision']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- bf16 SGLD check


def _energy_stats(e: torch.Tensor) -> dict:
    e = e.double()
    return {"mean": e.mean().item(), "std": e.std().item(), "finite": bool(torch.isfinite(e).all())}


def sgld_precision_check(model, sampler_cfg, *, n: int, image_shape, num_classes: int, device, seed: int = 0,
                         steps: int | None = None, tol: float = 0.1,
                         precisions: tuple[str, ...] = ("tf32", "bf16")) -> dict:
    """Run the same SGLD/PYLD chains (uniform start, same labels, same noise) in fp32 and in each of
    `precisions` (autocast bf16 / TF32 matmuls) and compare the sample energies E(x_K) of `sampler_cfg.energy`,
    all measured by the model in strict fp32. A precision is 'ok' when |mean - mean_fp32| and
    |std - std_fp32| are both <= tol * std_fp32 (and all finite); otherwise the verdict is 'keep fp32'.
    Also reported: the mean absolute pixel difference of the samples and the chain's per-step mean energy."""
    from .sampling import init_uniform, run_sampler, sampler_energy

    device = pick_device(device) if isinstance(device, str) else device
    cfg = sampler_cfg if steps is None else sampler_cfg.model_copy(update={"steps": steps})
    g = torch.Generator().manual_seed(seed)
    x0 = init_uniform(n, image_shape, generator=g).to(device)
    y = torch.randint(num_classes, (n,), generator=g).to(device)
    runs = {}
    for prec in ("fp32", *precisions):
        configure_backends(prec, device, deterministic=False)
        noise = torch.Generator(device=device).manual_seed(seed + 1)  # the same noise draws for every precision
        with autocast(prec, device):
            x, trace = run_sampler(model, x0, cfg, y=y, generator=noise, return_trace=True)
        _sync(device)
        runs[prec] = (x.float(), trace.float())
    configure_backends("fp32", device, deterministic=False)
    with torch.no_grad():
        energies = {p: sampler_energy(model, x, y, cfg.energy).float() for p, (x, _) in runs.items()}
    ref = _energy_stats(energies["fp32"])
    scale = ref["std"] if ref["std"] > 0 else float("nan")
    out = {"energy": cfg.energy, "sampler": cfg.kind, "steps": cfg.steps, "chains": n, "seed": seed, "tol": tol,
           "start": "uniform", "fp32": {**ref, "trace_mean": runs["fp32"][1].mean(dim=1).tolist()}, "precisions": {}}
    for prec in precisions:
        st = _energy_stats(energies[prec])
        d_mean, d_std = (st["mean"] - ref["mean"]) / scale, (st["std"] - ref["std"]) / scale
        ok = st["finite"] and ref["finite"] and abs(d_mean) <= tol and abs(d_std) <= tol
        out["precisions"][prec] = {
            **st, "delta_mean_in_std": d_mean, "delta_std_in_std": d_std,
            "mean_abs_pixel_diff": (runs[prec][0] - runs["fp32"][0]).abs().mean().item(),
            "trace_mean": runs[prec][1].mean(dim=1).tolist(),
            "verdict": f"{prec} ok" if ok else "keep fp32"}
    return out


# ----------------------------------------------------------------------------- `robust-ebm bench`


def bench_groups(profile, names, model: str | None) -> dict[str, dict]:
    """{models key: {method: MethodConfig}}. `model` puts every method on it, except that a method whose own
    model is a variant `<model>_*` of it (wrn28_10_jem, wrn28_10_jempp: the JEM family's WRNs) keeps its variant."""
    groups: dict[str, dict] = {}
    for name in names:
        own = profile.methods[name].model
        key = own if model is None or own.startswith(f"{model}_") else model
        groups.setdefault(key, {})[name] = profile.methods[name]
    return groups


def bench_profile(profile, names, args) -> dict:
    """`robust-ebm bench`: with `args.sgld_check` first the SGLD precision check of every sampler method, then
    every (batch, precision, method), printed as tables; with `args.json` all of it written to that file,
    rewritten after each part (a run stopped by a time limit keeps what it measured; `complete` says if not)."""
    import platform

    from .runtime import atomic_write_json

    groups = bench_groups(profile, names, args.model)
    batches = args.batch if isinstance(args.batch, list) else [args.batch]
    flops, peak = getattr(args, "flops", False), getattr(args, "peak_tflops", None)
    report = {"profile": profile.name, "rows": [], "sgld_check": [], "complete": False, "torch": torch.__version__,
              "cuda": torch.version.cuda, "python": platform.python_version()}

    def save():
        if getattr(args, "json", None):
            atomic_write_json(args.json, report)

    if getattr(args, "sgld_check", False):  # first: short, and it decides a setting
        def partial(checks):
            report["sgld_check"] = checks
            save()

        report["sgld_check"] = sgld_checks(profile, groups, args, on_result=partial)
    for batch in batches:
        for precision in getattr(args, "precision", None) or ["auto"]:
            for model_key, methods in groups.items():
                got = run_bench(methods, profile.models[model_key], batch, device=args.device, steps=args.steps,
                                warmup=args.warmup, precision=precision, flops=flops, peak_tflops=peak,
                                model_key=model_key, channels_last=profile.training.channels_last)
                print(format_bench(got), flush=True)
                report["rows"] += got
                save()
    report["complete"] = True
    save()
    if getattr(args, "json", None):
        print(f"robust-ebm bench: wrote {args.json}")
    return report


def sgld_checks(profile, groups, args, on_result=None) -> list[dict]:
    """`sgld_precision_check` for every method with a sampler, on fresh weights of its bench architecture, or on
    the trained classifier in `args.sgld_weights` (every method's sampler on that one model)."""
    from .models import build_model, load_classifier

    device, out, done = pick_device(args.device), [], {}
    weights = args.sgld_weights
    trained = None if weights is None else load_classifier(weights)[0].to(device).eval().requires_grad_(False)
    for model_key, methods in groups.items():
        for name, cfg in methods.items():
            if cfg.sampler is None:
                continue
            key = (model_key if trained is None else weights, cfg.sampler.model_dump_json())
            if key in done:  # the same sampler on the same architecture: the same chains, run once
                out.append({**done[key], "method": name, "same_as": done[key]["method"]})
                print(f"sgld check {name}: the same sampler and model as {done[key]['method']}", flush=True)
                continue
            torch.manual_seed(args.sgld_seed)
            model = trained if trained is not None else build_model(
                profile.models[model_key], num_classes=10, in_channels=3, image_size=32).to(device)
            shape = (model.in_channels, model.image_size, model.image_size)
            res = sgld_precision_check(model, cfg.sampler, n=args.sgld_chains, image_shape=shape,
                                       num_classes=model.num_classes, device=device, seed=args.sgld_seed,
                                       steps=args.sgld_steps, tol=args.sgld_tol)
            res |= {"method": name, "model": model_key if trained is None else str(weights),
                    "weights": "fresh (random init, seed sgld_seed)" if trained is None else f"trained: {weights}"}
            done[key] = res
            verdicts = ", ".join(f"{p}: {r['verdict']} (d_mean {r['delta_mean_in_std']:+.3f}, d_std "
                                 f"{r['delta_std_in_std']:+.3f} fp32 std)" for p, r in res["precisions"].items())
            print(f"sgld check {name} ({model_key}, {res['sampler']} {res['steps']} steps, {res['chains']} chains, "
                  f"E fp32 {res['fp32']['mean']:.4f} +- {res['fp32']['std']:.4f}): {verdicts}", flush=True)
            out.append(res)
            if on_result is not None:
                on_result(out)
    return out


__all__ = ["bench_profile", "bench_groups", "sgld_checks", "run_bench", "bench_method", "format_bench", "count_flops", "device_peak", "peak_for_name", "sgld_precision_check",
           "PEAK_TFLOPS"]
