"""Joint and Marginal Fisher scores (JEAT §4.2, Tab. 2, Eq. 23-24).

The Hyvärinen score-matching objective of the model density p ∝ exp(-E), with score s = -∇_x E:

    JFS = E_{(x,y)~data}[ ½ ||∇_x E(x,y)||² - tr(∇²_x E(x,y)) ]     (Eq. 23)
    MFS = E_{x~data}    [ ½ ||∇_x E(x)||²   - tr(∇²_x E(x))   ]     (Eq. 24)

Lower is better. The Hessian trace uses Hutchinson's estimator with M Rademacher probes,
tr(H) ≈ (1/M) Σ_m v_mᵀ H v_m, each Hessian-vector product by double backprop; `probes=None`
gives the exact trace (one backward pass per input dimension: for tests and tiny inputs).
Scores depend on the pixel scale (×4 between [0,1] and [-1,1]) and on BN mode: we use
[0,1] pixels and eval mode, and say so in the output.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..energy import joint_energy, marginal_energy
from ..runtime import model_mode
from .refclf import to_unit


def _hvp(grad: Tensor, x: Tensor, v: Tensor) -> Tensor:
    """H v for every sample, where grad = ∇_x Σ_b E(x_b) was built with create_graph=True."""
    (hv,) = torch.autograd.grad(grad, x, grad_outputs=v, retain_graph=True)
    return hv


def hutchinson_trace(grad: Tensor, x: Tensor, probes: int, generator: torch.Generator | None = None) -> Tensor:
    """(B,) estimate of tr(∇²_x E) as the mean of vᵀHv over `probes` Rademacher vectors v."""
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(probes):
        v = (torch.randint(0, 2, x.shape, generator=generator) * 2 - 1).to(x)
        total += (v * _hvp(grad, x, v)).flatten(1).sum(1)
    return total / probes


def exact_trace(grad: Tensor, x: Tensor) -> Tensor:
    """(B,) exact tr(∇²_x E): Σ_i e_iᵀ H e_i, one Hessian-vector product per input coordinate."""
    flat_dim = x[0].numel()
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(flat_dim):
        e = torch.zeros_like(x).flatten(1)
        e[:, i] = 1.0
        total += _hvp(grad, x, e.view_as(x)).flatten(1)[:, i]
    return total


def score_matching_terms(energy: Tensor, x: Tensor, probes: int | None, generator=None) -> tuple[Tensor, Tensor]:
    """Per-sample (½||∇_x E||², tr ∇²_x E) for energies (B,) computed from x (requires_grad)."""
    (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=True, retain_graph=True)
    trace = exact_trace(grad, x) if probes is None else hutchinson_trace(grad, x, probes, generator)
    return 0.5 * grad.flatten(1).pow(2).sum(1), trace


@contextmanager
def _eval_without_param_grads(model):
    """Eval mode (runtime.model_mode) and frozen parameters (only ∇_x is needed); both restored on exit."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with model_mode(model, "eval"):
            yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def fisher_scores(
    model,
    images: Tensor,
    labels: Tensor,
    *,
    probes: int | None = 10,
    batch_size: int = 100,
    generator: torch.Generator | None = None,
) -> dict:
    """JFS and MFS (Eq. 23-24) over `images` (uint8 or [0,1] floats) with their labels."""
    if probes is not None and probes < 1:
        raise ValueError(f"fisher probes must be >= 1 (or None for the exact trace), got {probes}")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"fisher_scores needs matching non-empty images/labels, got {len(images)} and {len(labels)}")
    device = next(model.parameters()).device
    sums = dict.fromkeys(("jfs_half_grad_sq", "jfs_trace", "mfs_half_grad_sq", "mfs_trace"), 0.0)
    squares = {"jfs": 0.0, "mfs": 0.0}  # sum of squared per-image scores, for the spread over images
    with _eval_without_param_grads(model):
        batches = zip(torch.split(images, batch_size), torch.split(labels, batch_size))
        for xb, yb in tqdm(batches, total=-(-len(images) // batch_size), desc="fisher scores", leave=False):
            x = to_unit(xb).to(device).requires_grad_(True)
            logits = model(x)
            for name, energy in (("jfs", joint_energy(logits, yb.to(device))), ("mfs", marginal_energy(logits))):
                half_sq, trace = score_matching_terms(energy, x, probes, generator)
                sums[f"{name}_half_grad_sq"] += half_sq.sum().item()
                sums[f"{name}_trace"] += trace.sum().item()
                squares[name] += (half_sq - trace).double().pow(2).sum().item()
    n = len(images)
    means = {k: v / n for k, v in sums.items()}
    scores = {name: means[f"{name}_half_grad_sq"] - means[f"{name}_trace"] for name in squares}
    # std over images of the per-image score (Hutchinson noise included): the claims stage's standard error
    spread = {f"{name}_std": (max(squares[name] - n * scores[name] ** 2, 0.0) / (n - 1)) ** 0.5 if n > 1 else 0.0
              for name in squares}
    return {
        "jfs": scores["jfs"],
        "mfs": scores["mfs"],
        **spread,
        **means,
        "probes": "exact" if probes is None else probes,
        "n": len(images),
        "pixel_scale": "[0,1]",
        "model_mode": "eval",
    }
