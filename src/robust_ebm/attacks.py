"""Gradient attacks on [0,1] images: FGSM and PGD (L∞, L2) on CE, energy, KL and MART objectives."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .schema_types import Fraction, Strict


class AttackConfig(Strict):
    """One attack. eps and step are in pixel units ([0,1] images)."""

    norm: Literal["linf", "l2"] = "linf"
    eps: Fraction = Field(8 / 255, ge=0.0)
    step: Fraction = Field(2 / 255, gt=0.0)
    steps: int = Field(10, ge=1)
    restarts: int = Field(1, ge=1)
    random_start: Literal["none", "uniform", "normal"] = "uniform"
    start_std: Fraction = Field(0.001, ge=0.0, description="std of the 'normal' start (TRADES: 0.001)")
    objective: Literal["ce", "joint_energy", "marginal_energy", "kl", "mart"] = "ce"
    targeted: bool = False
    project: bool = Field(True, description="project to the eps-ball every step (EB-JDAT's code does not)")
    model_mode: Literal["eval", "train"] = "eval"

    @model_validator(mode="after")
    def _check_budget(self):
        if self.norm == "linf" and self.eps > 1.0:
            raise ValueError(f"eps={self.eps} exceeds 1 for an L-inf attack on [0,1] images; write budgets in pixel units, e.g. '8/255'")
        return self
