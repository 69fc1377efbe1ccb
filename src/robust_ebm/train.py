"""The one training loop: every method, resumable, tracked, guarded against divergence.

Per iteration (any method; methods/base.py):

    prepared = method.prepare(model, Batch(x, y, x_px))      attacks / SGLD, no parameter gradient
    out      = method.loss(model, prepared)                   LossOutput(loss, terms, energies)
    guard(out)                                                non-finite, |loss| or energy gap too large?
    out.loss.backward(); optimiser step                       SAM: a second loss() at w + e_w, BN frozen
    schedule.step()                                           per-iteration lr (optim.py)

Per epoch: validation on the held-out split (clean and PGD-20 on its first
`val_n_examples` images; the test split is never read), the selection rule,
energy dynamics, then a full checkpoint (checkpoint.py). With
`checkpoint_every_steps` there are also mid-epoch checkpoints; each epoch's
batch order comes from (seed, epoch), so a resumed run skips the batches it
has done and continues bit-exactly on the CPU.

Resume: checkpoint.pt is resumed only when its resume key (code of the train
stage's import closure, the data it read, the settings train reads) equals
the current one; otherwise the run starts afresh, says why in one line, and
moves the previous files to out_dir/stale/. A finished checkpoint of the same
key is "resumed" at its end: model.pt is rewritten without a training step.

Divergence guard (anchors.md §1(d), lesson 6): a non-finite loss, |loss| >
max_abs_loss or |E(x_data) − E(x_sgld)| > max_energy_gap rolls back to the
last checkpoint, applies the remedy (lr_decay | more_sgld_steps | reseed),
records it, and retries; after max_retries `TrainingDiverged` is raised.

Precision: 'auto' is bf16 autocast on CUDA for methods without a sampler, and
TF32 (fp32 storage) for SGLD-based methods, whose Langevin chains add noise of
std 0.01 to gradients of size ~1: bf16's 8-bit mantissa (relative error 4e-3)
would blur exactly that signal, and AMP for SGLD is untested (anchors.md §17).
On the CPU 'auto' is fp32.

Outputs in out_dir: model.pt (selected weights, models.save_classifier),
checkpoint.pt (full state), replay_buffer.pt (sampler methods), train.json,
dynamics.json, grids/epoch_NNNN.png (replay-buffer grids).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import attacks, data, plan
from .checkpoint import load_checkpoint, restore, save_checkpoint, snapshot
from .config import validate_run
from .dynamics import DynamicsRecorder
from .inference import evaluate_inputs
from .methods import Batch, LossOutput, build_method
from .models import build_model, save_classifier
from .optim import SAM, LRSchedule, build_optimizer, frozen_bn_stats
from .runtime import atomic_torch_save, atomic_write_json, model_mode, note_fallback, pick_device, seed_everything


# Files of a run directory that belong to one training (moved to stale/ when it is not resumed).
RUN_FILES = ("checkpoint.pt", "model.pt", "train.json", "dynamics.json", "replay_buffer.pt", "grids")


class TrainingDiverged(RuntimeError):
    """The guard gave up: max_retries rollbacks did not cure the divergence."""


class _Bad(Exception):
    """Raised inside a step when the guard trips; caught by the loop."""

    def __init__(self, reason: str, value: float):
        super().__init__(reason)
        self.reason, self.value = reason, value


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (epoch streams, validation, reseeding)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------- precision and backends


def resolve_precision(precision: str, device: torch.device, uses_sampler: bool) -> str:
    """'auto' -> bf16 on CUDA without a sampler, tf32 on CUDA with one, fp32 on the CPU (module docstring)."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "tf32" if uses_sampler else "bf16"


def configure_backends(precision: str, device: torch.device, deterministic: bool) -> None:
    """TF32 matmuls for tf32/bf16, cudnn.benchmark unless deterministic (process-wide torch switches)."""
    if device.type == "cuda":
        fast = precision in ("tf32", "bf16")
        torch.backends.cuda.matmul.allow_tf32 = fast
        torch.backends.cudnn.allow_tf32 = fast
        torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ----------------------------------------------------------------------------- one step (shared with bench)


def build_parts(method_cfg, model_cfg, *, num_classes: int, image_shape, stats, device, seed: int,
                channels_last: bool = False):
    """Model, method (with its generator) and optimiser of one run.

    `channels_last` stores the convolution weights NHWC on every device: on the CPU (oneDNN) the
    WRN-16-2 TRADES step took 0.9x the CPU time of NCHW (docs/profile_jem.md).
    """
    model = build_model(model_cfg, num_classes=num_classes, in_channels=image_shape[0], image_size=image_shape[1])
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    generator = torch.Generator(device=device).manual_seed(derive_seed(seed, "method"))
    method = build_method(method_cfg, num_classes=num_classes, image_shape=tuple(image_shape), stats=stats,
                          device=device, generator=generator)
    optimizer = build_optimizer(model.parameters(), method_cfg.optim, device=device)
    return model, method, optimizer, generator


def train_step(model, method, optimizer, batch: Batch, *, epoch: int, precision: str, device: torch.device,
               check=None, dynamics: DynamicsRecorder | None = None, step: int = 0) -> LossOutput:
    """prepare -> loss -> check -> backward -> (SAM second pass) -> optimiser step. Returns the first LossOutput.

    No bf16 loss scaling is needed (bf16 has fp32's range), so there is no GradScaler.
    """
    with autocast(precision, device):
        prepared = method.prepare(model, batch, epoch=epoch)
    probe = dynamics is not None and dynamics.wants_probe(step, prepared)
    before = dynamics.probe_before(model, prepared) if probe else None
    with autocast(precision, device):
        out = method.loss(model, prepared, epoch=epoch)
    if check is not None:
        check(out)
    out.loss.backward()
    if isinstance(optimizer, SAM):
        optimizer.first_step()
        optimizer.zero_grad()
        with frozen_bn_stats(model), autocast(precision, device):
            second = method.loss(model, prepared, epoch=epoch)
        second.loss.backward()
        optimizer.second_step()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if before is not None:
        dynamics.probe_after(model, before)
    return out


# ----------------------------------------------------------------------------- data streams


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


class Streams:
    """The labelled stream and, for JEM-family methods, an independent p(x) stream.

    Epoch e's order and augmentation come from generators seeded by (seed, e, stream), so the
    batches of an epoch can be replayed: `epoch(e, skip=k)` starts at batch k.
    """

    def __init__(self, split, dcfg, *, needs_px: bool, seed: int, device):
        # Move the uint8 split to the device once; every epoch's loaders then index it in place.
        split = data.TensorSplit(split.images.to(device), split.labels.to(device))
        self.split, self.dcfg, self.seed, self.device = split, dcfg, seed, device
        n = len(split.labels)
        self.steps_per_epoch = n // dcfg.batch_size if dcfg.drop_last else -(-n // dcfg.batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training split has {n} images, fewer than one batch of {dcfg.batch_size}; "
                             "lower data.batch_size or use a larger data set")
        self.px_batch = (dcfg.px_batch_size or dcfg.batch_size) if needs_px else None
        if self.px_batch is not None and self.px_batch > n:
            raise ValueError(f"data.px_batch_size {self.px_batch} exceeds the {n} training images")

    def _loader(self, batch_size, augment, noise_std, *key, drop_last=True):
        g = torch.Generator().manual_seed(derive_seed(self.seed, *key))
        return data.make_loader(self.split, batch_size, augment=augment, noise_std=noise_std, shuffle=True,
                                drop_last=drop_last, generator=g, device=self.device,
                                crop_padding=self.dcfg.crop_padding)

    def _px(self, epoch: int):
        d = self.dcfg
        augment = d.px_augment if d.px_augment is not None else d.augment
        noise = d.px_noise_std if d.px_noise_std is not None else d.noise_std
        for cycle in itertools.count():
            yield from self._loader(self.px_batch, augment, noise, epoch, "px", cycle)

    def epoch(self, epoch: int, skip: int = 0):
        labelled = self._loader(self.dcfg.batch_size, self.dcfg.augment, self.dcfg.noise_std, epoch, "labelled",
                                drop_last=self.dcfg.drop_last)
        px = self._px(epoch) if self.px_batch is not None else None
        for i, (x, y) in enumerate(labelled):
            if i >= self.steps_per_epoch:
                return
            x_px = next(px)[0] if px is not None else None
            if i >= skip:
                yield Batch(x=x, y=y, x_px=x_px)


# ----------------------------------------------------------------------------- the trainer


def data_digest(splits, stats) -> str:
    """sha256 of what training reads from the data stage: train and valid splits, class statistics."""
    digest = hashlib.sha256()

    def add(name, value):
        digest.update(name.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode() + value.view(torch.uint8).numpy().tobytes()
                          if value.numel() else b"empty")
        else:
            digest.update(repr(value).encode())

    for name in ("train", "valid"):
        split = getattr(splits, name)
        add(f"{name}.images", split.images)
        add(f"{name}.labels", split.labels)
    for key, value in sorted((stats.to_dict() if stats is not None else {}).items()):
        add(f"stats.{key}", value)
    return digest.hexdigest()[:16]


def resume_key(run, splits, stats) -> dict:
    """What a checkpoint was written under; it is resumed only when all three still hold.

    code: the train stage's import closure (plan.code_digest); data: `data_digest`; settings: the
    digest of the RunConfig fields train reads (plan.run_settings_digest, Snakemake's rerun trigger).
    """
    return {"code": plan.code_digest("train"), "data": data_digest(splits, stats),
            "settings": plan.run_settings_digest(run, "train")}


class Trainer:
    """Holds the live objects of one run; `fit` trains, `finish` writes the outputs."""

    def __init__(self, run, splits, stats, out_dir, tracker=None):
        self.run, self.splits, self.out_dir, self.tracker = run, splits, Path(out_dir), tracker
        self.fallbacks: list[str] = []
        self.device = pick_device(run.device, self.fallbacks)
        m, t = run.method, run.training
        seed_everything(run.seed)
        self.precision = resolve_precision(t.precision, self.device, m.sampler is not None)
        configure_backends(self.precision, self.device, t.deterministic)
        images = splits.train.images
        self.image_shape = tuple(images.shape[1:])
        self.num_classes = run.dataset.num_classes
        self.model, self.method, self.optimizer, self.generator = build_parts(
            m, run.model, num_classes=self.num_classes, image_shape=self.image_shape, stats=stats,
            device=self.device, seed=run.seed, channels_last=t.channels_last)
        self.fmodel = torch.compile(self.model) if t.compile else self.model
        self.streams = Streams(data.training_split(splits, m.data.holdout), m.data, needs_px=self.method.needs_px_stream, seed=run.seed,
                               device=self.device)
        self.schedule = LRSchedule(self.optimizer, m.schedule, steps_per_epoch=self.streams.steps_per_epoch)
        self.dynamics = DynamicsRecorder(m.dynamics, attack_cfg=t.val_pgd, device=self.device)
        n_fixed = min(m.dynamics.n_fixed, len(splits.train.labels))
        if n_fixed < m.dynamics.n_fixed:
            note_fallback(self.fallbacks, f"energy dynamics on {n_fixed} training images, {m.dynamics.n_fixed} "
                          "requested (dynamics.n_fixed exceeds the training split)")
        if 0 < len(splits.valid.labels) < t.val_n_examples:
            note_fallback(self.fallbacks, f"validation on {len(splits.valid.labels)} images, {t.val_n_examples} "
                          "requested (training.val_n_examples exceeds the validation split)")
        self.fixed = (_as_float(splits.train.images[:n_fixed]), splits.train.labels[:n_fixed].long())
        self.best_state: dict | None = None
        self.progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "seconds": 0.0, "images": 0,
                         "best_epoch": None, "best_metric": None, "val": [], "retries": [], "seed_offset": 0,
                         "resume_key": resume_key(run, splits, stats)}
        self.ckpt_path = self.out_dir / "checkpoint.pt"

    # ---- state
    def _stateful(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "schedule": self.schedule,
                "method": self.method, "dynamics": self.dynamics}

    def save(self) -> None:
        ckpt = snapshot(self._stateful(), {"method": self.generator}, dict(self.progress))
        ckpt["best_state"] = self.best_state
        save_checkpoint(self.ckpt_path, ckpt)

    def load(self) -> None:
        """Restore the last checkpoint (the guard's rollback, or a resume `stale_reason` accepted)."""
        ckpt = load_checkpoint(self.ckpt_path)
        self.progress = restore(ckpt, self._stateful(), {"method": self.generator})
        self.best_state = ckpt.get("best_state")

    def stale_reason(self) -> str | None:
        """Why checkpoint.pt must not be resumed (None: it may): another code, data or settings."""
        saved = load_checkpoint(self.ckpt_path)["progress"].get("resume_key")
        if not isinstance(saved, dict):
            return "it carries no resume key (written by an older robust-ebm)"
        now = self.progress["resume_key"]
        changed = [k for k in now if saved.get(k) != now[k]]
        if not changed:
            return None
        what = {"code": "the train code", "data": "the data", "settings": "the settings"}
        return " and ".join(f"{what[k]} changed ({saved.get(k)} -> {now[k]})" for k in changed)

    def move_aside(self, reason: str) -> Path:
        """Move the previous run's files into out_dir/stale/ (replacing an older one) before a fresh start."""
        stale = self.out_dir / "stale"
        shutil.rmtree(stale, ignore_errors=True)
        stale.mkdir()
        for name in RUN_FILES:
            if (self.out_dir / name).exists():
                os.replace(self.out_dir / name, stale / name)
        atomic_write_json(stale / "why.json", {"reason": reason})
        return stale

    # ---- guard
    def _check(self, out: LossOutput) -> None:
        g = self.run.method.guard
        value = float(out.loss.detach())
        if not math.isfinite(value):
            raise _Bad("non-finite loss", value)
        if abs(value) > g.max_abs_loss:
            raise _Bad(f"|loss| > max_abs_loss {g.max_abs_loss:g}", value)
        if g.max_energy_gap is not None and "E_x/sgld" in out.energies:
            data_key = "E_x/px" if "E_x/px" in out.energies else "E_x/clean"
            if data_key in out.energies:
                gap = float(out.energies[data_key].float().mean() - out.energies["E_x/sgld"].float().mean())
                if not math.isfinite(gap) or abs(gap) > g.max_energy_gap:
                    raise _Bad(f"|E(x_data) - E(x_sgld)| > max_energy_gap {g.max_energy_gap:g}", gap)

    def _recover(self, bad: _Bad) -> None:
        g = self.run.method.guard
        step = self.progress["global_step"] + 1
        tried = [r["remedy"] for r in self.progress["retries"]]
        if len(tried) >= g.max_retries:
            raise TrainingDiverged(
                f"run {self.run.run_name} diverged at step {step} (epoch {self.progress['epoch'] + 1}): "
                f"{bad.reason}, value {bad.value!r}; {len(tried)} retr{'y' if len(tried) == 1 else 'ies'} "
                f"with remedies {tried or 'none'} did not help (guard.max_retries={g.max_retries}). "
                "Lower optim.lr, raise sampler.steps, or change guard.remedy.")
        self.load()  # last good state (includes every earlier remedy)
        retry = len(self.progress["retries"]) + 1
        if g.remedy == "lr_decay":
            self.schedule.scale_lr(g.lr_factor)
            change = f"lr scaled by {g.lr_factor:g} (total scale {self.schedule.scale:g})"
        elif g.remedy == "more_sgld_steps":
            change = self.method.apply_remedy(g.remedy)
        else:
            self.progress["seed_offset"] += 1
            self.generator.manual_seed(derive_seed(self.run.seed, "reseed", self.progress["seed_offset"]))
            torch.manual_seed(derive_seed(self.run.seed, "reseed-global", self.progress["seed_offset"]))
            change = f"new seeds (offset {self.progress['seed_offset']})"
        record = {"retry": retry, "step": step, "reason": bad.reason, "value": bad.value, "remedy": g.remedy,
                  "change": change, "resumed_from_step": self.progress["global_step"]}
        self.progress["retries"] = self.progress["retries"] + [record]
        tqdm.write(f"[guard] {self.run.run_name}: {bad.reason} ({bad.value!r}) at step {step}; "
                   f"rolled back to step {record['resumed_from_step']}, {change}")
        if self.tracker is not None:
            self.tracker.log_metrics({"guard/retries": retry, "guard/bad_value": bad.value}, step=step)
            self.tracker.set_tags({f"guard.retry{retry}": f"step {step}: {bad.reason}; {change}"})
        self.save()

    # ---- validation and selection
    def validate(self, epoch: int) -> dict:
        t = self.run.training
        n = min(t.val_n_examples, len(self.splits.valid.labels))
        if n == 0:
            return {}
        x, y = _as_float(self.splits.valid.images[:n]), self.splits.valid.labels[:n].long()
        g = torch.Generator(device=self.device).manual_seed(derive_seed(self.run.seed, "val", epoch))
        with model_mode(self.model, "eval"):
            clean = evaluate_inputs(self.model, x, y, batch_size=t.val_batch_size, device=self.device,
                                    desc="val clean")
            adv = evaluate_inputs(self.model, x, y, batch_size=t.val_batch_size, device=self.device,
                                  transform=lambda xb, yb: attacks.perturb(self.model, xb, yb, t.val_pgd, generator=g),
                                  desc="val pgd")
        return {"clean_acc": clean["correct"].float().mean().item(), "pgd_acc": adv["correct"].float().mean().item(),
                "n": n}

    def _select(self, epoch: int, val: dict) -> None:
        sel = self.run.method.select
        if sel.rule == "last" or epoch < sel.from_epoch:
            return
        metric = val["clean_acc" if sel.rule == "best_val_clean" else "pgd_acc"]
        if self.progress["best_metric"] is None or metric > self.progress["best_metric"]:
            self.progress["best_metric"], self.progress["best_epoch"] = metric, epoch
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    # ---- the loop
    def fit(self, max_steps: int | None = None) -> bool:
        """Train to the last epoch (True) or until max_steps optimiser steps in total (False)."""
        while True:
            try:
                return self._epochs(max_steps)
            except _Bad as bad:
                self._recover(bad)

    def _account(self, images: int) -> None:
        """Add the wall-clock time since the last call and `images` to the run's totals."""
        now = time.perf_counter()
        self.progress["seconds"] += now - self._clock
        self.progress["images"] += images
        self._clock = now

    def _epochs(self, max_steps) -> bool:
        m, p = self.run.method, self.progress
        while p["epoch"] < m.schedule.epochs:
            epoch = p["epoch"] + 1
            self.model.train()
            self._clock = time.perf_counter()
            bar = tqdm(self.streams.epoch(epoch, skip=p["step_in_epoch"]), total=self.streams.steps_per_epoch,
                       initial=p["step_in_epoch"], desc=f"{self.run.method_name} epoch {epoch}/{m.schedule.epochs}",
                       unit="it", leave=False)
            with contextlib.closing(bar):
                if not self._epoch_steps(bar, epoch, max_steps):
                    return False
            self._end_epoch(epoch)
        return True

    def _epoch_steps(self, bar, epoch: int, max_steps) -> bool:
        """The remaining steps of one epoch; False when max_steps stopped the run first."""
        t, p = self.run.training, self.progress
        window, losses, seen, epoch_images, tic = [], [], 0, 0, time.perf_counter()
        for batch in bar:
            if max_steps is not None and p["global_step"] >= max_steps:
                self._account(seen)
                self.save()
                return False
            out = train_step(self.fmodel, self.method, self.optimizer, batch, epoch=epoch, precision=self.precision,
                             device=self.device, check=self._check, dynamics=self.dynamics, step=p["global_step"])
            self.schedule.step()
            self.dynamics.observe(out.energies)
            p["step_in_epoch"] += 1
            p["global_step"] += 1
            seen += batch.x.shape[0]
            epoch_images += batch.x.shape[0]
            window.append(out.terms)
            losses.append(out.loss.detach())  # stays on the device until the window is logged
            if p["global_step"] % t.log_every_steps == 0:
                rate = epoch_images / max(time.perf_counter() - tic, 1e-9)
                self._log_window(window, losses, out, rate)
                bar.set_postfix({k: f"{v:.3g}" for k, v in out.terms.items()} | {"img/s": f"{rate:.0f}"})
                window, losses = [], []
            if t.checkpoint_every_steps and p["global_step"] % t.checkpoint_every_steps == 0 \
                    and p["step_in_epoch"] < self.streams.steps_per_epoch:
                self._account(seen)
                seen = 0
                self.save()
        self._account(seen)
        return True

    def _log_window(self, window, losses, out, rate) -> None:
        """Window means of the method's loss terms (train/<term>) and of its total loss (train/loss, the
        key every method shares, so MLflow overlays the curves of several methods)."""
        if self.tracker is None:
            return
        keys = window[-1].keys()
        metrics = {f"train/{k}": sum(w[k] for w in window) / len(window) for k in keys}
        metrics["train/loss"] = torch.stack(losses).float().mean().item()
        metrics |= {f"energy/{k}": v.float().mean().item() for k, v in out.energies.items()}
        metrics |= {"train/lr": self.schedule.get_last_lr()[0], "train/images_per_s": rate}
        self.tracker.log_metrics(metrics, step=self.progress["global_step"])

    def _end_epoch(self, epoch: int) -> None:
        p, t = self.progress, self.run.training
        val = self.validate(epoch)
        if val:
            self._select(epoch, val)
        extra = {}
        if self.dynamics.is_divergence_epoch(epoch):
            g = torch.Generator(device=self.device).manual_seed(derive_seed(self.run.seed, "dynamics", epoch))
            x, y = (v.to(self.device) for v in self.fixed)
            extra = self.dynamics.divergence(self.model, x, y, g, batch_size=t.val_batch_size)
        row = self.dynamics.end_epoch(epoch, extra)
        p["val"] = p["val"] + [{"epoch": epoch, **val}]
        p["epoch"], p["step_in_epoch"] = epoch, 0
        self.save()
        tqdm.write(self._epoch_line(epoch, val))
        if self.tracker is not None:
            self.tracker.log_metrics({f"val/{k}": v for k, v in val.items()} | {f"dynamics/{k}": v for k, v in row.items()}
                                     | {"epoch": epoch}, step=p["global_step"])
        if t.grid_every_epochs and epoch % t.grid_every_epochs == 0:
            self._grid(epoch)

    def _epoch_line(self, epoch: int, val: dict) -> str:
        """One plain log line per epoch: validation accuracies, the selected epoch so far, throughput."""
        p = self.progress
        parts = [f"{self.run.method_name} epoch {epoch}/{self.run.method.schedule.epochs}"]
        if val:
            parts.append(f"val n={val['n']}: clean {100 * val['clean_acc']:.1f}%, PGD-{self.run.training.val_pgd.steps} "
                         f"{100 * val['pgd_acc']:.1f}%")
        parts.append(f"best epoch {p['best_epoch']}" if p["best_epoch"] is not None else "no epoch selected yet")
        if p["seconds"]:
            parts.append(f"{p['images'] / p['seconds']:.0f} img/s")
        return "; ".join(parts)

    def _grid(self, epoch: int) -> None:
        from torchvision.utils import save_image  # imported here: torchvision takes seconds to import

        samples = self.method.samples()
        if samples is None:
            return
        path = self.out_dir / "grids" / f"epoch_{epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(samples[:64].float().clamp(0, 1).cpu(), path, nrow=8)
        if self.tracker is not None:
            self.tracker.log_image(path, "train/samples", step=epoch)

    # ---- outputs
    def finish(self, complete: bool) -> dict:
        """Write model.pt, replay_buffer.pt, train.json and dynamics.json; return the train.json dict."""
        run, m, p = self.run, self.run.method, self.progress
        if m.select.rule != "last" and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            selected = p["best_epoch"]
        else:
            selected = p["epoch"]
        val_sel = next((v for v in p["val"] if v["epoch"] == selected), {})
        d = m.data
        eval_noise = self.method.needs_px_stream and d.noise_std > 0
        meta = {"method": run.method_name, "loss": m.loss, "dataset": run.dataset_name, "seed": run.seed,
                "profile": run.profile, "epoch": selected, "epochs_trained": p["epoch"], "select_rule": m.select.rule,
                "val": {k: v for k, v in val_sel.items() if k != "epoch"},
                "train_noise_std": float(d.noise_std), "eval_noise": bool(eval_noise),
                "noise_std": float(d.noise_std) if eval_noise else 0.0, "complete": complete}
        samples = self.method.samples()
        if samples is not None:
            atomic_torch_save({"images": samples.detach().float().clamp(0, 1).cpu(), "labels": None},
                              self.out_dir / "replay_buffer.pt")
            meta["buffer"] = "replay_buffer.pt"
        save_classifier(self.out_dir / "model.pt", self.model, run.model, meta)
        seconds = p["seconds"]
        summary = {"run": run.run_name, "epochs": p["epoch"], "steps": p["global_step"], "complete": complete,
                   "selected_epoch": selected, "best_epoch": p["best_epoch"], "select_rule": m.select.rule,
                   "val": p["val"], "seconds": seconds, "images_per_s": p["images"] / seconds if seconds else None,
                   "retries": p["retries"], "precision": self.precision, "device": str(self.device),
                   "fallbacks": self.fallbacks}
        atomic_write_json(self.out_dir / "train.json", summary)
        atomic_write_json(self.out_dir / "dynamics.json", self.dynamics.records())
        if self.tracker is not None:
            self.tracker.log_metrics({"train/seconds": seconds, "train/retries": len(p["retries"]),
                                      "train/selected_epoch": selected})
            self.tracker.log_artifact(self.out_dir / "train.json")
            self.tracker.log_artifact(self.out_dir / "dynamics.json")
        return summary


def train_stage(run, data_dir, out_dir, tracker=None, *, max_steps: int | None = None, resume: bool = True) -> dict:
    """Train one (profile, dataset, method, seed) run; resumes from out_dir/checkpoint.pt when present."""
    splits, stats = data.load_prepared(data_dir)
    return train_splits(run, splits, stats, out_dir, tracker, max_steps=max_steps, resume=resume)


def train_splits(run, splits, stats, out_dir, tracker=None, *, max_steps: int | None = None,
                 resume: bool = True) -> dict:
    """`train_stage` on splits already in memory (train and valid are read; test never is)."""
    validate_run(run)  # the load-time checks again: a RunConfig may have been edited since
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(run, splits, stats, out_dir, tracker)  # settings are logged where the run is opened
    reason = trainer.stale_reason() if resume and trainer.ckpt_path.exists() else None
    if reason is None and resume and trainer.ckpt_path.exists():
        trainer.load()
        tqdm.write(f"resuming {run.run_name} after epoch {trainer.progress['epoch']}, "
                   f"step {trainer.progress['step_in_epoch']} of the next")
    else:
        if reason is not None:
            stale = trainer.move_aside(reason)
            tqdm.write(f"starting {run.run_name} afresh: {trainer.ckpt_path.name} is not resumed because {reason}; "
                       f"the previous files are in {stale}")
        trainer.save()  # step 0: the guard always has a state to roll back to
    complete = trainer.fit(max_steps)
    return trainer.finish(complete)
