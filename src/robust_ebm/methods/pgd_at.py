"""PGD adversarial training (Madry et al.; papers.md §2.3).

    min_θ (1/B) Σ CE(f(x + δ*), y),   δ* = argmax_{‖δ‖∞ ≤ ε} CE(f(x + δ), y)

The inner maximisation is `cfg.attack` (objective ce: PGD-10, 2/255, 8/255, uniform start).
"""

from __future__ import annotations

from torch import Tensor

from ..energy import cross_entropy
from .base import AdversarialMethod, LossOutput, energies, output


class PGDAT(AdversarialMethod):
    """CE at the adversarial example only (no clean forward)."""

    attack_objectives = ("ce",)

    def loss(self, model, prepared: dict[str, Tensor], *, epoch: int) -> LossOutput:
        y = prepared["y"]
        logits_adv = model(prepared["x_adv"])
        ce = cross_entropy(logits_adv, y).mean()
        return output(ce, {"ce_adv": ce}, energies(y, adv=logits_adv))
