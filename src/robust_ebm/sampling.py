"""Langevin samplers (SGLD, PYLD) and the persistent replay buffer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .schema_types import Fraction, Strict


class SamplerConfig(Strict):
    """SGLD / PYLD settings.

    Decoupled (JEM code):  x <- x - step_size * grad E(x) + noise_std * N(0, I)
    Coupled (JEAT Alg. 1, Eq. 17):  x <- x - (step_size / 2) * grad E(x) + sqrt(step_size) * N(0, I)
    energy: marginal E(x) (JEM p(x)), joint E(x,y) (JEAT Eq. 17), ce = E(x,y) - E(x) (JEAT Eq. 16).
    Momentum (WEAT):  v <- momentum * v - (step_size / 2) * grad E;  x <- x + v + noise
    """

    kind: Literal["sgld", "pyld"] = "sgld"
    energy: Literal["marginal", "joint", "ce"] = "marginal"
    steps: int = Field(20, ge=0)
    step_size: Fraction = Field(1.0, gt=0.0)
    noise_std: Fraction = Field(0.01, ge=0.0)
    coupled: bool = False
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(None, gt=0.0, description="per-pixel clamp of the gradient (JEM++ --eps)")
    update_clip: float | None = Field(None, gt=0.0, description="clamp of the whole update (WEAT eps)")
    clamp: bool = True
    inner_steps: int = Field(5, ge=1, description="PYLD inner steps through the stem only")
    inner_lr: Fraction = Field(0.2, gt=0.0, description="PYLD inner step size")
    model_mode: Literal["eval", "train"] = "eval"
    buffer_size: int = Field(10000, ge=0)
    reinit_prob: float = Field(0.05, ge=0.0, le=1.0)
    init: Literal["uniform", "gaussian", "pca", "data", "gm"] = "uniform"
