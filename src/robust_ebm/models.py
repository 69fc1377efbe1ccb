"""Classifiers: WRN-d-k, ResNet-18, PreAct ResNet-18 and a tiny CNN, behind one interface."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .schema_types import Strict


class ModelConfig(Strict):
    """Architecture of a classifier. `input_range` is the normalisation the model applies to [0,1] pixels."""

    arch: Literal["wrn", "resnet18", "preact_resnet18", "tiny_cnn"]
    depth: int = Field(28, ge=10, description="WRN depth, 6n+4")
    width: int = Field(10, ge=1, description="WRN widen factor / tiny CNN base channels")
    norm: Literal["none", "batch"] = "batch"
    bn_momentum: float = Field(0.1, gt=0.0, le=1.0, description="PyTorch convention; JEM++ uses 0.9")
    activation: Literal["relu", "leaky_relu"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    input_range: Literal["unit", "symmetric"] = "unit"
