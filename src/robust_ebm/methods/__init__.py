"""Training methods: one file per method family, each a loss over a batch (see base.Method).

REGISTRY maps `MethodConfig.loss` names to classes; `build_method(cfg, ...)` instantiates one;
`method_problems(cfg)` lists what a method cannot run with (params, attack, sampler, p(x) stream)
and `dataset_problems(cfg, num_classes)` what it cannot run with on a data set, which config.py
checks for every method and every run when params.yaml loads. This package never imports config.
"""

from __future__ import annotations

from ..schema_types import Strict
from .base import Batch, LossOutput, Method, parse_params
from .ebjdat import EBJDAT
from .jeat import JEAT, PreJEAT
from .jem import JEM, JEMPP, SADAJEM
from .mail import MAILTrades
from .mart import MART
from .pgd_at import PGDAT
from .standard import Standard
from .trades import TRADES
from .weat import WEAT

REGISTRY: dict[str, type[Method]] = {
    "standard": Standard,
    "pgd_at": PGDAT,
    "trades": TRADES,
    "mart": MART,
    "mail_tr": MAILTrades,
    "prejeat": PreJEAT,
    "jeat": JEAT,
    "jem": JEM,
    "jempp": JEMPP,
    "sadajem": SADAJEM,
    "weat": WEAT,
    "ebjdat": EBJDAT,
}


def method_class(loss_name: str) -> type[Method]:
    if loss_name not in REGISTRY:
        raise ValueError(f"unknown method loss '{loss_name}'; allowed: {', '.join(REGISTRY)}")
    return REGISTRY[loss_name]


def validate_params(loss_name: str, params: dict) -> Strict:
    """The validated params of method `loss_name`; ValueError names unknown keys and the allowed ones."""
    return parse_params(method_class(loss_name).Params, params, loss_name)


def method_problems(cfg) -> list[tuple[str, str]]:
    """(key, problem) for every setting of MethodConfig `cfg` that its method cannot run with (base.Method)."""
    if cfg.loss not in REGISTRY:
        return [("loss", f"unknown method loss '{cfg.loss}'; allowed: {', '.join(REGISTRY)}")]
    return REGISTRY[cfg.loss].config_problems(cfg)


def dataset_problems(cfg, num_classes: int) -> list[tuple[str, str]]:
    """(key, problem) for every setting of `cfg` its method cannot run with on a data set of `num_classes`
    classes (base.Method.dataset_problems); an unknown loss is `method_problems`' to report."""
    return REGISTRY[cfg.loss].dataset_problems(cfg, num_classes) if cfg.loss in REGISTRY else []


def build_method(cfg, **kw) -> Method:
    """Instantiate the method named by cfg.loss (kw: num_classes, image_shape, stats, device, generator)."""
    return method_class(cfg.loss)(cfg, **kw)


__all__ = ["Batch", "LossOutput", "Method", "REGISTRY", "build_method", "dataset_problems", "method_problems",
           "validate_params"]
