"""The divergence guard (anchors.md §1(d), lesson 6).

`Guard.check` runs on every step's first LossOutput, before backward: a non-finite loss, |loss| >
max_abs_loss or |E(x_data) − E(x_sgld)| > max_energy_gap raises `Diverging`. The loop catches it
and calls `Guard.recover`, which rolls back to the last checkpoint, applies the remedy
(lr_decay | more_sgld_steps | reseed), records it in the run's progress (train.json "retries",
MLflow guard/retries and a guard.retryN tag), saves, and lets the loop retry; after max_retries
it raises `TrainingDiverged` instead.
"""

from __future__ import annotations

import math

import torch

from .methods import LossOutput
from .runtime import derive_seed


class TrainingDiverged(RuntimeError):
    """The guard gave up: max_retries rollbacks did not cure the divergence."""


class Diverging(Exception):
    """Raised inside a step when the guard trips; caught by the loop, which calls `Guard.recover`."""

    def __init__(self, reason: str, value: float):
        super().__init__(reason)
        self.reason, self.value = reason, value


class Guard:
    """One run's guard: its settings (GuardConfig), the run's name for messages, its seed for reseeding."""

    def __init__(self, cfg, *, run_name: str, seed: int):
        self.cfg, self.run_name, self.seed = cfg, run_name, seed

    def check(self, out: LossOutput) -> None:
        g = self.cfg
        value = float(out.loss.detach())
        if not math.isfinite(value):
            raise Diverging("non-finite loss", value)
        if abs(value) > g.max_abs_loss:
            raise Diverging(f"|loss| > max_abs_loss {g.max_abs_loss:g}", value)
        if g.max_energy_gap is not None and "E_x/sgld" in out.energies:
            data_key = "E_x/px" if "E_x/px" in out.energies else "E_x/clean"
            if data_key in out.energies:
                gap = float(out.energies[data_key].float().mean() - out.energies["E_x/sgld"].float().mean())
                if not math.isfinite(gap) or abs(gap) > g.max_energy_gap:
                    raise Diverging(f"|E(x_data) - E(x_sgld)| > max_energy_gap {g.max_energy_gap:g}", gap)

    def recover(self, bad: Diverging, trainer) -> None:
        """Roll `trainer` back, apply the remedy, record and report it, save; or raise TrainingDiverged.

        Uses the trainer's progress, load(), save(), schedule, method, generator and report.
        """
        g, progress = self.cfg, trainer.progress
        step = progress["global_step"] + 1
        tried = [r["remedy"] for r in progress["retries"]]
        if len(tried) >= g.max_retries:
            raise TrainingDiverged(
                f"run {self.run_name} diverged at step {step} (epoch {progress['epoch'] + 1}): "
                f"{bad.reason}, value {bad.value!r}; {len(tried)} retr{'y' if len(tried) == 1 else 'ies'} "
                f"with remedies {tried or 'none'} did not help (guard.max_retries={g.max_retries}). "
                "Lower optim.lr, raise sampler.steps, or change guard.remedy.")
        trainer.load()  # last good state (includes every earlier remedy)
        progress = trainer.progress
        change = self._remedy(progress, trainer.schedule, trainer.method, trainer.generator)
        record = {"retry": len(progress["retries"]) + 1, "step": step, "reason": bad.reason, "value": bad.value,
                  "remedy": g.remedy, "change": change, "resumed_from_step": progress["global_step"]}
        progress["retries"] = progress["retries"] + [record]
        trainer.report.retry(record)
        trainer.save()

    def _remedy(self, progress: dict, schedule, method, generator: torch.Generator) -> str:
        """Apply guard.remedy to the rolled-back state; returns what changed."""
        g = self.cfg
        if g.remedy == "lr_decay":
            schedule.scale_lr(g.lr_factor)
            return f"lr scaled by {g.lr_factor:g} (total scale {schedule.scale:g})"
        if g.remedy == "more_sgld_steps":
            return method.apply_remedy(g.remedy)
        progress["seed_offset"] += 1
        generator.manual_seed(derive_seed(self.seed, "reseed", progress["seed_offset"]))
        torch.manual_seed(derive_seed(self.seed, "reseed-global", progress["seed_offset"]))
        return f"new seeds (offset {progress['seed_offset']})"
