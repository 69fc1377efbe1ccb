"""Standard training: min_θ (1/B) Σ CE(f(x), y) = (1/B) Σ [E(x,y) − E(x)] (papers.md §2.1).

Noise-injection training (JEAT §3.2, papers.md §2.2) is this method with `data.noise_std` σ ∈
{8,16,24}/255: the data pipeline adds x + N(0, σ²I) before the batch reaches the method.
"""

from __future__ import annotations

from torch import Tensor

from ..energy import cross_entropy
from .base import Batch, LossOutput, Method, energies, output


class Standard(Method):
    """CE on the (possibly noisy) labelled batch."""

    def prepare(self, model, batch: Batch, *, epoch: int) -> dict[str, Tensor]:
        return {"x": batch.x, "y": batch.y}

    def loss(self, model, prepared: dict[str, Tensor], *, epoch: int) -> LossOutput:
        y = prepared["y"]
        logits = model(prepared["x"])
        ce = cross_entropy(logits, y).mean()
        return output(ce, {"ce": ce}, energies(y, clean=logits))
