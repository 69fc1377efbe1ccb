"""Adapter to the official AutoAttack (Croce & Hein 2020; package `pyautoattack`).

`version='standard'` runs APGD-CE, APGD-T (9 targets), FAB-T (9 targets) and
Square (5000 queries) in sequence on the points still robust; a point counts
as robust only if every attack fails (per-point worst case). `'rand'` runs
APGD-CE and APGD-DLR with EOT over 20 forward passes, for models with
test-time randomness; `'plus'` adds restarts and untargeted attacks.

The `Classifier` takes [0,1] images and normalises inside, so it is attacked
as is, in eval mode; ε is in pixel units. AutoAttack's own log (attack by
attack) and its sanity flags (randomness, softmax outputs, dynamic
defences, Square beating the white-box attacks) are printed while it runs,
and the flags are also returned.

Resuming: with `state_path`, AutoAttack records which attacks are done and
which points are still robust (after every batch). pyautoattack 0.2.0 cannot
resume from its own state file (it writes the attack set as a Python repr
that it cannot read back, and its restore branch never defines `y_adv`), so
a rerun with an existing state file is handled here: the remaining attacks
run on the points still robust, and the file is completed.
"""

from __future__ import annotations

import ast
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pyautoattack import AutoAttack
from pydantic import Field
from torch import Tensor, nn

from .runtime import model_mode
from .runtime import atomic_write_json, pick_device
from .schema_types import Fraction, Strict

_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
_VERSIONS = ("standard", "plus", "rand")


# --------------------------------------------------------------------------- settings (evaluation.autoattack)


class AutoAttackConfig(Strict):
    version: Literal["standard", "plus", "rand"] = "standard"
    norm: Literal["Linf", "L2"] = "Linf"
    eps: Fraction = Field(8 / 255, gt=0.0)
    n_examples: int | None = Field(None, ge=1, description="null: full test set")
    batch_size: int = Field(128, ge=1)
    seed: int = 0


class _FlagCollector(logging.Handler):
    """Keeps AutoAttack's warnings (its sanity-check flags)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def _autoattack_log(verbose: bool):
    """Show AutoAttack's log lines while it runs and collect its flags; leave the logger as found."""
    logger = logging.getLogger("auto-attack")
    flags, printer = _FlagCollector(), logging.StreamHandler()
    printer.setFormatter(logging.Formatter("[autoattack] %(message)s"))
    old_level, old_propagate = logger.level, logger.propagate
    handlers = [flags, printer] if verbose else [flags]
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.propagate = not verbose  # printed once, by our handler
    for h in handlers:
        logger.addHandler(h)
    try:
        yield flags.messages
    finally:
        for h in handlers:
            logger.removeHandler(h)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _check_inputs(model, x, y, eps, norm, version, batch_size, n_examples, device):
    if norm.lower() not in _NORMS:
        raise ValueError(f"norm must be one of Linf, L2, L1, got '{norm}'")
    if version not in _VERSIONS:
        raise ValueError(f"version must be one of {_VERSIONS}, got '{version}' (headline numbers use 'standard')")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (pixel units, e.g. 8/255), got {eps}")
    if norm.lower() == "linf" and eps > 1:
        raise ValueError(f"eps={eps} exceeds 1 for an L-inf attack on [0,1] images; write it in pixel units (8/255)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if x.dim() != 4 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be NCHW and y of shape (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if n_examples is not None and not 1 <= n_examples <= x.shape[0]:
        raise ValueError(f"n_examples must be in [1, {x.shape[0]}] (the number of points given), got {n_examples}")
    low, high = torch.aminmax(x)
    if low < 0 or high > 1:
        raise ValueError(f"x must be [0,1] pixels (got [{low:.3f}, {high:.3f}]); the model normalises inside")
    param = next(model.parameters(), None)
    if param is not None and param.device.type != device.type:
        raise ValueError(f"the model is on {param.device} but device={device}; move the model with model.to(device)")


def run_autoattack(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = "Linf",
                   version: str = "standard", batch_size: int, seed: int, device: str | torch.device,
                   n_examples: int | None = None, state_path: str | Path | None = None,
                   verbose: bool = True, return_adv: bool = False) -> dict:
    """Official AutoAttack on the first `n_examples` points of (x, y).

    Returns {"n", "clean_accuracy", "robust_accuracy", "version", "eps", "norm",
    "attacks", "seed", "flags", "per_example_robust": list[bool]} (+ "x_adv" when
    return_adv: adversarial images where an attack of this run succeeded, else x).
    """
    device = pick_device(device) if isinstance(device, str) else device
    _check_inputs(model, x, y, eps, norm, version, batch_size, n_examples, device)
    norm = _NORMS[norm.lower()]
    n = x.shape[0] if n_examples is None else n_examples
    x, y = x[:n].detach(), y[:n]
    state_path = Path(state_path) if state_path is not None else None

    with model_mode(model, "eval"), _autoattack_log(verbose) as flags:
        with torch.no_grad():
            n_classes = model(x[:1].to(device)).shape[1]
        if version != "rand" and n_classes < 10:
            raise ValueError(f"AutoAttack '{version}' targets 9 classes (APGD-T, FAB-T) but the model has "
                             f"{n_classes}; use version='rand' or a data set with >= 10 classes")
        if n_classes < 3:
            raise ValueError(f"AutoAttack's DLR loss needs >= 3 classes, the model has {n_classes}")
        adversary = AutoAttack(model, eps=float(eps), norm=norm, version=version, device=device, seed=seed)
        attacks = list(adversary.attacks_to_run)

        if state_path is not None and state_path.exists():
            robust, clean_accuracy, x_adv = _resume(adversary, x, y, batch_size, state_path)
        else:
            with torch.no_grad():
                clean_correct = torch.cat([model(xb.to(device)).argmax(1).cpu() == yb.cpu()
                                           for xb, yb in zip(x.split(batch_size), y.split(batch_size))])
            x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size, state_path=state_path)
            robust = y_adv.cpu() == y.cpu()
            clean_accuracy = clean_correct.float().mean().item()

    result = {
        "n": n, "clean_accuracy": clean_accuracy, "robust_accuracy": robust.float().mean().item(),
        "version": version, "eps": float(eps), "norm": norm, "attacks": attacks, "seed": seed,
        "flags": list(flags), "per_example_robust": robust.tolist(),
    }
    if return_adv:
        result["x_adv"] = x_adv.detach().cpu()
    return result


def _read_state(path: Path) -> dict:
    """AutoAttack's state JSON. pyautoattack writes the set of attacks as its Python repr, hence literal_eval."""
    raw = json.loads(path.read_text())
    attacks = raw["_attacks_to_run"]
    flags = raw.get("_robust_flags")
    return {"attacks": set(ast.literal_eval(attacks) if isinstance(attacks, str) else attacks),
            "run": set(raw.get("_run_attacks") or []),
            "robust": None if flags is None else torch.tensor(flags, dtype=torch.bool),
            "clean_accuracy": float(raw.get("_clean_accuracy", float("nan")))}


def _resume(adversary: AutoAttack, x: Tensor, y: Tensor, batch_size: int, state_path: Path):
    """Finish an evaluation from AutoAttack's state file: remaining attacks on the points still robust."""
    state = _read_state(state_path)
    attacks = adversary.attacks_to_run
    if state["attacks"] != set(attacks) or state["robust"] is None or len(state["robust"]) != len(x):
        raise ValueError(f"{state_path} belongs to another evaluation (attacks {sorted(state['attacks'])}, "
                         f"{None if state['robust'] is None else len(state['robust'])} points); "
                         "delete it or pass another state_path")
    robust = state["robust"]
    remaining = [a for a in attacks if a not in state["run"]]
    idx = robust.nonzero().squeeze(1)
    x_adv = x.clone()
    if remaining and len(idx) > 0:
        logging.getLogger("auto-attack").info(f"resuming from {state_path}: {', '.join(remaining)} "
                                              f"on {len(idx)} robust points")
        adversary.attacks_to_run = remaining
        x_sub, y_sub = adversary.run_standard_evaluation(x[idx], y[idx], batch_size=batch_size)
        robust[idx] = y_sub.cpu() == y[idx].cpu()
        x_adv[idx] = x_sub.to(x_adv.device)
        adversary.attacks_to_run = attacks
    atomic_write_json(state_path, {"_attacks_to_run": sorted(attacks), "_run_attacks": sorted(attacks),
                                   "_robust_flags": robust.tolist(), "_clean_accuracy": state["clean_accuracy"],
                                   "path": str(state_path)})
    return robust, state["clean_accuracy"], x_adv
