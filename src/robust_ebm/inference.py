"""Using a trained classifier: batched forward passes in eval mode, and energies and decisions on a set of images.

Below the stages (train's validation, evaluate, generate, metrics and figures all call it); a model is
read for a run with `models.load_for_run`, and the energies file is `energies_file`. Every pass runs
under `runtime.model_mode(model, "eval")`, so each submodule gets its own mode back afterwards.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .energy import joint_energy, marginal_energy
from .runtime import model_mode


def batched_outputs(model: nn.Module, step: Callable[..., Tensor | tuple[Tensor, ...]], *inputs: Tensor,
                    batch_size: int, desc: str | None = "forward") -> tuple[Tensor, ...]:
    """`step(*batch)` on `inputs` split into batches of `batch_size` (rows aligned), with no gradients and `model`
    in eval mode; each output of `step` concatenated over the batches on the CPU. `step` moves its batch
    to the model's device and calls the model. `desc`: the progress bar's name (None: no bar)."""
    parts: list[tuple[Tensor, ...]] = []
    batches = zip(*(torch.split(t, batch_size) for t in inputs))
    with torch.no_grad(), model_mode(model, "eval"):
        for batch in tqdm(batches, total=-(-len(inputs[0]) // batch_size), desc=desc, unit="batch", leave=False,
                          disable=desc is None):
            out = step(*batch)
            parts.append(tuple(o.cpu() for o in (out if isinstance(out, tuple) else (out,))))
    return tuple(torch.cat(column) for column in zip(*parts))


def evaluate_inputs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    device: torch.device,
    transform: Callable[[Tensor, Tensor], Tensor] | None = None,
    predict: Callable[[Tensor], Tensor] | None = None,
    desc: str = "clean",
) -> dict[str, Tensor]:
    """One batched pass, model in eval mode: x -> transform(x, y) (an attack, or identity), then energies and
    decisions.

    Returns CPU tensors `correct` (bool), `marginal` E(x'), `joint` E(x',y) and
    `linf` = max |x' - x| per example. `predict` overrides argmax f(x') (EOT). The
    transform runs with gradients (an attack sets its own model mode, restored after).
    """
    out: dict[str, list[Tensor]] = {"correct": [], "marginal": [], "joint": [], "linf": []}
    with model_mode(model, "eval"):
        for start in tqdm(range(0, len(x), batch_size), desc=desc, unit="batch", leave=False):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            xa = transform(xb, yb) if transform is not None else xb
            with torch.no_grad():
                logits = model(xa)
                pred = predict(xa) if predict is not None else logits.argmax(1)
            out["correct"].append((pred == yb).cpu())
            out["marginal"].append(marginal_energy(logits).float().cpu())
            out["joint"].append(joint_energy(logits, yb).float().cpu())
            out["linf"].append((xa - xb).abs().flatten(1).amax(1).cpu())
    return {k: torch.cat(v) for k, v in out.items()}
