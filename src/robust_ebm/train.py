"""The one training loop: every method, resumable, tracked, guarded against divergence.

Per iteration (any method; methods/base.py), `train_step`:

    prepared = method.prepare(model, Batch(x, y, x_px))      attacks / SGLD, no parameter gradient
    out      = method.loss(model, prepared)                   LossOutput(loss, terms, energies)
    guard.check(out)                                          non-finite, |loss| or energy gap too large?
    out.loss.backward(); optimiser step                       SAM: a second loss() at w + e_w, BN frozen
    schedule.step()                                           per-iteration lr (optim.py)

Per epoch: validation on the held-out split (clean and PGD-20 on its first
`val_n_examples` images; the test split is never read), the selection rule,
energy dynamics, then a full checkpoint (checkpoint.py). With
`checkpoint_every_steps` there are also mid-epoch checkpoints; each epoch's
batch order comes from (seed, epoch) (streams.py), so a resumed run skips the
batches it has done and continues bit-exactly on the CPU.

The Trainer's pieces, each in its own module:
    streams.py      the replayable labelled and p(x) batches
    resume.py       the resume key; a checkpoint of another key is not resumed, its files move to stale/
                    (a finished checkpoint of the same key is "resumed" at its end: model.pt is rewritten
                    without a training step)
    divergence.py   the guard: rollback to the last checkpoint, a remedy, a retry, or TrainingDiverged
    progress.py     the progress bar, log lines, MLflow metrics, model.pt's meta and train.json

Precision: 'auto' is bf16 autocast on CUDA for methods without a sampler, and
TF32 (fp32 storage) for SGLD-based methods, whose Langevin chains add noise of
std 0.01 to gradients of size ~1: bf16's 8-bit mantissa (relative error 4e-3)
would blur exactly that signal, and AMP for SGLD is untested (anchors.md §17).
On the CPU 'auto' is fp32.

Outputs in out_dir, named by plan.PATTERNS (`Trainer.file`): model.pt (selected weights,
models.save_classifier), checkpoint.pt (full state), replay_buffer.pt (every run: the SGLD samples of a
sampler method, zero images otherwise; `Trainer.buffer_file`), train.json, dynamics.json; and
grids/epoch_NNNN.png (replay-buffer grids, progress.py).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import attacks, data, plan
from .checkpoint import load_checkpoint, restore, save_checkpoint, snapshot
from .config import validate_run
from .divergence import Diverging, Guard
from .dynamics import DynamicsRecorder
from .inference import evaluate_inputs
from .methods import Batch, LossOutput, build_method
from .models import build_model, place, save_classifier
from .optim import SAM, LRSchedule, build_optimizer, frozen_bn_stats
from .progress import Report, model_meta, train_record
from .resume import move_aside, resume_key, stale_reason
from .runtime import (atomic_torch_save, atomic_write_json, derive_seed, model_mode, note_fallback, pick_device,
                      seed_everything)
from .streams import Streams


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
    """Model, method (with its generator) and optimiser of one run (`channels_last`: `models.place`)."""
    model = build_model(model_cfg, num_classes=num_classes, in_channels=image_shape[0], image_size=image_shape[1])
    model = place(model, device, channels_last)
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


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Holds the live objects of one run; `fit` trains, `finish` writes the outputs."""

    def __init__(self, run, splits, stats, out_dir, tracker=None):
        self.run, self.splits, self.out_dir = run, splits, Path(out_dir)
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
        self.streams = Streams(data.training_split(splits, m.data.holdout), m.data,
                               needs_px=self.method.needs_px_stream, seed=run.seed, device=self.device)
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
        self.guard = Guard(m.guard, run_name=run.run_name, seed=run.seed)
        self.report = Report(run, tracker, self.out_dir)
        self.progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "seconds": 0.0, "images": 0,
                         "best_epoch": None, "best_metric": None, "val": [], "retries": [], "seed_offset": 0,
                         "resume_key": resume_key(run, splits, stats)}
        self.ckpt_path = self.file("checkpoint")

    def file(self, key: str) -> Path:
        """The run directory's file of plan.PATTERNS[key] (model, train_json, dynamics, replay_buffer, checkpoint)."""
        return plan.beside(self.out_dir, "model_dir", key)

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

    # ---- the loop
    def fit(self, max_steps: int | None = None) -> bool:
        """Train to the last epoch (True) or until max_steps optimiser steps in total (False)."""
        while True:
            try:
                return self._epochs(max_steps)
            except Diverging as bad:
                self.guard.recover(bad, self)  # roll back and remedy, or raise TrainingDiverged

    def _epochs(self, max_steps) -> bool:
        p = self.progress
        while p["epoch"] < self.run.method.schedule.epochs:
            epoch, skip = p["epoch"] + 1, p["step_in_epoch"]
            self.model.train()
            self._clock = time.perf_counter()
            log = self.report.epoch_log(self.streams.epoch(epoch, skip=skip), epoch, initial=skip,
                                        total=self.streams.steps_per_epoch, schedule=self.schedule)
            with contextlib.closing(log):
                if not self._epoch_steps(log, epoch, max_steps):
                    return False
            self._end_epoch(epoch)
        return True

    def _epoch_steps(self, log, epoch: int, max_steps) -> bool:
        """The remaining steps of one epoch; False when max_steps stopped the run first."""
        p, every = self.progress, self.run.training.checkpoint_every_steps
        seen = 0
        for batch in log:
            if max_steps is not None and p["global_step"] >= max_steps:
                self._account(seen)
                self.save()
                return False
            out = train_step(self.fmodel, self.method, self.optimizer, batch, epoch=epoch, precision=self.precision,
                             device=self.device, check=self.guard.check, dynamics=self.dynamics, step=p["global_step"])
            self.schedule.step()
            self.dynamics.observe(out.energies)
            p["step_in_epoch"] += 1
            p["global_step"] += 1
            seen += batch.x.shape[0]
            log.update(out, batch.x.shape[0], p["global_step"])
            if every and p["global_step"] % every == 0 and p["step_in_epoch"] < self.streams.steps_per_epoch:
                self._account(seen)
                seen = 0
                self.save()
        self._account(seen)
        return True

    def _account(self, images: int) -> None:
        """Add the wall-clock time since the last call and `images` to the run's totals."""
        now = time.perf_counter()
        self.progress["seconds"] += now - self._clock
        self.progress["images"] += images
        self._clock = now

    def _end_epoch(self, epoch: int) -> None:
        """Validation, selection, energy dynamics, a checkpoint, the epoch's report and sample grid."""
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
        self.report.epoch(epoch, val, row, p)
        if t.grid_every_epochs and epoch % t.grid_every_epochs == 0:
            self.report.grid(self.method.samples(), epoch)

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

    # ---- outputs
    def buffer_file(self) -> dict:
        """replay_buffer.pt: {"images": float [0,1] (N,C,H,W), "labels": None, "method", "empty": None or why}.
        A method without samples (no SGLD sampler, or no buffer) writes (0,C,H,W) images and says so."""
        samples = self.method.samples()
        if samples is not None:
            return {"images": samples.detach().float().clamp(0, 1).cpu(), "labels": None,
                    "method": self.run.method_name, "empty": None}
        return {"images": torch.zeros((0, *self.image_shape)), "labels": None, "method": self.run.method_name,
                "empty": f"method '{self.run.method_name}' keeps no replay buffer (it draws no SGLD samples in training)"}

    def finish(self, complete: bool) -> dict:
        """Write model.pt, replay_buffer.pt, train.json and dynamics.json; return the train.json dict."""
        p = self.progress
        if self.run.method.select.rule != "last" and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            selected = p["best_epoch"]
        else:
            selected = p["epoch"]
        meta = model_meta(self.run, self.method.needs_px_stream, p, selected, complete)
        model_path, buffer_path = self.file("model"), self.file("replay_buffer")
        atomic_torch_save(self.buffer_file(), buffer_path)
        meta["buffer"] = os.path.relpath(buffer_path, model_path.parent)
        save_classifier(model_path, self.model, self.run.model, meta)
        summary = train_record(self.run, p, selected, complete, precision=self.precision, device=self.device,
                               fallbacks=self.fallbacks)
        files = [atomic_write_json(self.file("train_json"), summary),
                 atomic_write_json(self.file("dynamics"), self.dynamics.records())]
        self.report.finished(summary, files)
        return summary


def train_stage(run, data_dir, out_dir, tracker=None, *, max_steps: int | None = None, resume: bool = True) -> dict:
    """Train one (profile, dataset, method, seed) run; resumes from its checkpoint in out_dir when present."""
    splits, stats = data.load_prepared(data_dir)
    return train_splits(run, splits, stats, out_dir, tracker, max_steps=max_steps, resume=resume)


def train_splits(run, splits, stats, out_dir, tracker=None, *, max_steps: int | None = None,
                 resume: bool = True) -> dict:
    """`train_stage` on splits already in memory (train and valid are read; test never is)."""
    validate_run(run)  # the load-time checks again: a RunConfig may have been edited since
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(run, splits, stats, out_dir, tracker)  # settings are logged where the run is opened
    resumable = resume and trainer.ckpt_path.exists()
    reason = stale_reason(trainer.ckpt_path, trainer.progress["resume_key"]) if resumable else None
    if resumable and reason is None:
        trainer.load()
        tqdm.write(f"resuming {run.run_name} after epoch {trainer.progress['epoch']}, "
                   f"step {trainer.progress['step_in_epoch']} of the next")
    else:
        if reason is not None:
            stale = move_aside(out_dir, reason)
            tqdm.write(f"starting {run.run_name} afresh: {trainer.ckpt_path.name} is not resumed because {reason}; "
                       f"the previous files are in {stale}")
        trainer.save()  # step 0: the guard always has a state to roll back to
    complete = trainer.fit(max_steps)
    return trainer.finish(complete)
