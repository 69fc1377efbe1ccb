"""Energy statistics of clean, adversarial and generated sets, and the gaps between them.

Energies come from `robust_ebm.energy`: E(x,y) = -f(x)[y], E(x) = -logsumexp f(x).

- EB-JDAT Tab. 1: gap of mean E(x,y) between clean and PGD-20 images, and between clean and
  generated images:  gap(clean -> B) = mean_B E - mean_clean E  (signed; > 0 means B has higher energy).
- WEAT §4: ΔE(x) = E(x) - E(x*), x* the adversarial version of x (paired; a mean over images).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..energy import joint_energy, marginal_energy
from ..inference import batched_outputs
from .refclf import to_unit

QUANTILES = {"q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75, "q95": 0.95}
KINDS = ("E_x", "E_xy")


def compute_energies(model, images: Tensor, labels: Tensor, *, batch_size: int = 256) -> dict[str, Tensor]:
    """{"E_x": (N,), "E_xy": (N,)} of a classifier in eval mode (inference.batched_outputs)."""
    device = next(model.parameters()).device

    def step(xb, yb):
        logits = model(to_unit(xb).to(device))
        return marginal_energy(logits), joint_energy(logits, yb.to(device))

    e_x, e_xy = batched_outputs(model, step, images, labels, batch_size=batch_size, desc="energies")
    return {"E_x": e_x, "E_xy": e_xy}


def summarize(energies: Tensor) -> dict:
    """Mean, std, quantiles and count of a 1-D energy tensor."""
    e = torch.as_tensor(energies, dtype=torch.float64).flatten()
    if e.numel() == 0:
        raise ValueError("cannot summarise an empty energy set")
    q = torch.quantile(e, torch.tensor(list(QUANTILES.values()), dtype=torch.float64))
    return {"mean": e.mean().item(), "std": e.std().item() if e.numel() > 1 else 0.0,
            **{k: v.item() for k, v in zip(QUANTILES, q)}, "n": e.numel()}


def mean_gap(reference: Tensor, other: Tensor) -> float:
    """mean(other) - mean(reference): EB-JDAT Tab. 1's gap (unpaired sets allowed)."""
    return torch.as_tensor(other, dtype=torch.float64).mean().item() - torch.as_tensor(reference, dtype=torch.float64).mean().item()


def paired_delta(clean: Tensor, adversarial: Tensor) -> dict:
    """WEAT's ΔE = E(x) - E(x*) over paired images: mean and std of the per-image differences."""
    clean, adversarial = torch.as_tensor(clean, dtype=torch.float64), torch.as_tensor(adversarial, dtype=torch.float64)
    if clean.shape != adversarial.shape:
        raise ValueError(f"paired ΔE needs one adversarial image per clean image, got {tuple(clean.shape)} vs {tuple(adversarial.shape)}")
    d = clean - adversarial
    return {"mean": d.mean().item(), "std": d.std().item() if d.numel() > 1 else 0.0, "n": d.numel()}


def energy_report(sets: dict[str, dict[str, Tensor]], *, reference: str = "clean", paired: tuple[str, ...] = ()) -> dict:
    """Summaries of every set and kind, gaps of every set to `reference`, and ΔE for `paired` sets.

    `sets` maps a set name ("clean", "pgd20", "generated/sgld", ...) to {"E_x": ..., "E_xy": ...};
    `paired` names the sets whose images are adversarial versions of the reference images, in order
    (a shorter set, e.g. AutoAttack on fewer images, pairs with the first images of the reference).
    """
    if reference not in sets:
        raise ValueError(f"energy_report needs the reference set '{reference}', got sets {sorted(sets)}")
    report = {"summary": {name: {k: summarize(v) for k, v in kinds.items() if k in KINDS} for name, kinds in sets.items()},
              "gap": {}, "delta": {}}
    for name, kinds in sets.items():
        if name == reference:
            continue
        for kind in KINDS:
            if kind in kinds and kind in sets[reference]:
                report["gap"][f"{kind}/{reference}->{name}"] = mean_gap(sets[reference][kind], kinds[kind])
                if name in paired:
                    clean = sets[reference][kind][: len(kinds[kind])]
                    report["delta"][f"{kind}/{reference}-{name}"] = paired_delta(clean, kinds[kind])
    return report
