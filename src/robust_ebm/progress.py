"""What a training run tells its user: the progress bar, plain log lines, MLflow metrics, and its records.

`Report` is the one place that writes to tqdm and to the tracker (None: nothing is tracked);
`EpochLog` is one epoch's bar and window of loss terms (torchvision's MetricLogger, for this loop);
`model_meta` and `train_record` are the dicts stored in model.pt and written as train.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .methods import LossOutput

GRIDS = "grids"  # the run directory's folder of sample grids (`Report.grid`)


class EpochLog:
    """Iterates one epoch's batches under a progress bar; `update` after each step logs, every
    `every` global steps, the window means of the loss terms to the tracker and the bar."""

    def __init__(self, batches, *, desc: str, total: int, initial: int, every: int, tracker, schedule):
        self.bar = tqdm(batches, total=total, initial=initial, desc=desc, unit="it", leave=False)
        self.every, self.tracker, self.schedule = every, tracker, schedule
        self.window: list[dict[str, float]] = []
        self.losses: list[torch.Tensor] = []
        self.images, self.tic = 0, time.perf_counter()

    def __iter__(self):
        return iter(self.bar)

    def close(self) -> None:
        self.bar.close()

    def update(self, out: LossOutput, images: int, step: int) -> None:
        self.images += images
        self.window.append(out.terms)
        self.losses.append(out.loss.detach())  # stays on the device until the window is logged
        if step % self.every == 0:
            rate = self.images / max(time.perf_counter() - self.tic, 1e-9)
            self._log_window(out, rate, step)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in out.terms.items()} | {"img/s": f"{rate:.0f}"})
            self.window, self.losses = [], []

    def _log_window(self, out: LossOutput, rate: float, step: int) -> None:
        """Window means of the method's loss terms (train/<term>) and of its total loss (train/loss, the
        key every method shares, so MLflow overlays the curves of several methods)."""
        if self.tracker is None:
            return
        window = self.window
        metrics = {f"train/{k}": sum(w[k] for w in window) / len(window) for k in window[-1].keys()}
        metrics["train/loss"] = torch.stack(self.losses).float().mean().item()
        metrics |= {f"energy/{k}": v.float().mean().item() for k, v in out.energies.items()}
        metrics |= {"train/lr": self.schedule.get_last_lr()[0], "train/images_per_s": rate}
        self.tracker.log_metrics(metrics, step=step)


class Report:
    """The run's bar, lines, metrics, sample grids and artifacts."""

    def __init__(self, run, tracker, out_dir: Path):
        self.run, self.tracker, self.out_dir = run, tracker, Path(out_dir)

    def epoch_log(self, batches, epoch: int, *, total: int, initial: int, schedule) -> EpochLog:
        m = self.run.method
        return EpochLog(batches, desc=f"{self.run.method_name} epoch {epoch}/{m.schedule.epochs}", total=total,
                        initial=initial, every=self.run.training.log_every_steps, tracker=self.tracker,
                        schedule=schedule)

    def epoch(self, epoch: int, val: dict, dynamics_row: dict, progress: dict) -> None:
        """The epoch's line and its validation and dynamics metrics."""
        tqdm.write(self._epoch_line(epoch, val, progress))
        if self.tracker is not None:
            self.tracker.log_metrics({f"val/{k}": v for k, v in val.items()}
                                     | {f"dynamics/{k}": v for k, v in dynamics_row.items()}
                                     | {"epoch": epoch}, step=progress["global_step"])

    def _epoch_line(self, epoch: int, val: dict, progress: dict) -> str:
        """One plain log line per epoch: validation accuracies, the selected epoch so far, throughput."""
        p = progress
        parts = [f"{self.run.method_name} epoch {epoch}/{self.run.method.schedule.epochs}"]
        if val:
            parts.append(f"val n={val['n']}: clean {100 * val['clean_acc']:.1f}%, "
                         f"PGD-{self.run.training.val_pgd.steps} {100 * val['pgd_acc']:.1f}%")
        parts.append(f"best epoch {p['best_epoch']}" if p["best_epoch"] is not None else "no epoch selected yet")
        if p["seconds"]:
            parts.append(f"{p['images'] / p['seconds']:.0f} img/s")
        return "; ".join(parts)

    def grid(self, samples: torch.Tensor | None, epoch: int) -> None:
        """grids/epoch_NNNN.png of the first 64 samples (replay buffer), when the method has samples."""
        from torchvision.utils import save_image  # imported here: torchvision takes seconds to import

        if samples is None:
            return
        path = self.out_dir / GRIDS / f"epoch_{epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(samples[:64].float().clamp(0, 1).cpu(), path, nrow=8)
        if self.tracker is not None:
            self.tracker.log_image(path, "train/samples", step=epoch)

    def retry(self, record: dict) -> None:
        """A divergence-guard rollback (divergence.Guard.recover's record)."""
        r = record
        tqdm.write(f"[guard] {self.run.run_name}: {r['reason']} ({r['value']!r}) at step {r['step']}; "
                   f"rolled back to step {r['resumed_from_step']}, {r['change']}")
        if self.tracker is not None:
            self.tracker.log_metrics({"guard/retries": r["retry"], "guard/bad_value": r["value"]}, step=r["step"])
            self.tracker.set_tags({f"guard.retry{r['retry']}": f"step {r['step']}: {r['reason']}; {r['change']}"})

    def finished(self, summary: dict, files: list[Path]) -> None:
        """The run's totals (train.json) and its output files."""
        if self.tracker is not None:
            self.tracker.log_metrics({"train/seconds": summary["seconds"], "train/retries": len(summary["retries"]),
                                      "train/selected_epoch": summary["selected_epoch"]})
            for path in files:
                self.tracker.log_artifact(path)


def model_meta(run, needs_px_stream: bool, progress: dict, selected: int, complete: bool) -> dict:
    """The meta stored in model.pt (models.save_classifier): what the weights are and how to evaluate them."""
    m, p = run.method, progress
    val_sel = next((v for v in p["val"] if v["epoch"] == selected), {})
    d = m.data
    eval_noise = needs_px_stream and d.noise_std > 0
    return {"method": run.method_name, "loss": m.loss, "dataset": run.dataset_name, "seed": run.seed,
            "profile": run.profile, "epoch": selected, "epochs_trained": p["epoch"], "select_rule": m.select.rule,
            "val": {k: v for k, v in val_sel.items() if k != "epoch"},
            "train_noise_std": float(d.noise_std), "eval_noise": bool(eval_noise),
            "noise_std": float(d.noise_std) if eval_noise else 0.0, "complete": complete}


def train_record(run, progress: dict, selected: int, complete: bool, *, precision: str, device, fallbacks) -> dict:
    """train.json: steps, validation per epoch, the selected epoch, retries, time and where it ran."""
    p, seconds = progress, progress["seconds"]
    return {"run": run.run_name, "epochs": p["epoch"], "steps": p["global_step"], "complete": complete,
            "selected_epoch": selected, "best_epoch": p["best_epoch"], "select_rule": run.method.select.rule,
            "val": p["val"], "seconds": seconds, "images_per_s": p["images"] / seconds if seconds else None,
            "retries": p["retries"], "precision": precision, "device": str(device), "fallbacks": fallbacks}
