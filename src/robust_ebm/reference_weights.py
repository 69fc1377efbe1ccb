"""State-dict keys of the reference code bases <-> this package's `Classifier` keys.

Users bring checkpoints trained with the official code (JEM, JEM++, SADA-JEM, TRADES, MART, MAIL):
`from_reference` renames their keys to ours, `to_reference` goes back (the golden fixtures load our
weights into the reference classes with it, which is what shows the two architectures equal).

    layout      reference class (file)                                          our ModelConfig
    jem         JEM train_wrn_ebm.py CCF(Wide_ResNet) (wideresnet.py); also      arch wrn, block jem
                JEM++ models/jem_models.py CCF(model='wrn') (models/wideresnet.py)
    jempp       JEM++ models/jem_models.py CCF(model='yopo') (wideresnet_yopo.py) arch wrn, block jem
    sadajem     SADA-JEM models/jem_models.py CCF (models/wideresnet.py: no f.linear) arch wrn, block jem
    trades_wrn  TRADES / MART / MAIL WideResNet (models/wideresnet.py)            arch wrn, block trades
    resnet18    kuangliu ResNet18 (TRADES models/resnet.py, MART/MAIL resnet.py)  arch resnet18

Keys a reference holds that the forward pass never reads are dropped on import and filled on export:
JEM's `energy_output` (zeros: only the unconditional F uses it) and `f.linear` (JEM wideresnet.py:102,
built with 10 classes and never called: zeros), JEM++'s aliases `f.layer_one` (= conv1)
and `f.other_layers.*` (= layer1..3, bn1), TRADES' `sub_block1` (built, never called; a copy of block1).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

# (our key template, reference key template); {s} stage, {b} block, {i} index, {p} parameter name
_WRN_JEM = (
    ("stem.{p}", "f.conv1.{p}"),
    ("trunk.stage{s}.{b}.norm1.{p}", "f.layer{s}.{b}.bn1.{p}"),
    ("trunk.stage{s}.{b}.conv1.{p}", "f.layer{s}.{b}.conv1.{p}"),
    ("trunk.stage{s}.{b}.norm2.{p}", "f.layer{s}.{b}.bn2.{p}"),
    ("trunk.stage{s}.{b}.conv2.{p}", "f.layer{s}.{b}.conv2.{p}"),
    ("trunk.stage{s}.{b}.shortcut.{p}", "f.layer{s}.{b}.shortcut.0.{p}"),
    ("trunk.norm.{p}", "f.bn1.{p}"),
    ("fc.{p}", "class_output.{p}"),
)
_WRN_TRADES = (
    ("stem.{p}", "conv1.{p}"),
    ("trunk.stage{s}.{b}.norm1.{p}", "block{s}.layer.{b}.bn1.{p}"),
    ("trunk.stage{s}.{b}.conv1.{p}", "block{s}.layer.{b}.conv1.{p}"),
    ("trunk.stage{s}.{b}.norm2.{p}", "block{s}.layer.{b}.bn2.{p}"),
    ("trunk.stage{s}.{b}.conv2.{p}", "block{s}.layer.{b}.conv2.{p}"),
    ("trunk.stage{s}.{b}.shortcut.{p}", "block{s}.layer.{b}.convShortcut.{p}"),
    ("trunk.norm.{p}", "bn1.{p}"),
    ("fc.{p}", "fc.{p}"),
)
_RESNET18 = (
    ("stem.{p}", "conv1.{p}"),
    ("trunk.norm.{p}", "bn1.{p}"),
    ("trunk.stage{s}.{b}.conv1.{p}", "layer{s}.{b}.conv1.{p}"),
    ("trunk.stage{s}.{b}.norm1.{p}", "layer{s}.{b}.bn1.{p}"),
    ("trunk.stage{s}.{b}.conv2.{p}", "layer{s}.{b}.conv2.{p}"),
    ("trunk.stage{s}.{b}.norm2.{p}", "layer{s}.{b}.bn2.{p}"),
    ("trunk.stage{s}.{b}.shortcut.{i}.{p}", "layer{s}.{b}.shortcut.{i}.{p}"),
    ("fc.{p}", "linear.{p}"),
)
RULES = {"jem": _WRN_JEM, "jempp": _WRN_JEM, "sadajem": _WRN_JEM, "trades_wrn": _WRN_TRADES, "resnet18": _RESNET18}
LAYOUTS = tuple(RULES)
# the block layout (ModelConfig.block) each WRN reference needs
BLOCK_OF = {"jem": "jem", "jempp": "jem", "sadajem": "jem", "trades_wrn": "trades"}


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name in "sbi":
        pattern = pattern.replace(re.escape("{" + name + "}"), rf"(?P<{name}>\d+)")
    return re.compile("^" + pattern.replace(re.escape("{p}"), r"(?P<p>.+)") + "$")


def _rename(key: str, rules, forward: bool) -> str | None:
    for ours, theirs in rules:
        source, target = (ours, theirs) if forward else (theirs, ours)
        match = _regex(source).match(key)
        if match:
            return target.format(**match.groupdict())
    return None


def _check_layout(layout: str) -> None:
    if layout not in RULES:
        raise ValueError(f"unknown reference layout '{layout}'; use one of {LAYOUTS}")


def to_reference(state: dict[str, Tensor], layout: str) -> dict[str, Tensor]:
    """Our `Classifier.state_dict()` -> the reference class's state dict (strict-loadable)."""
    _check_layout(layout)
    out = {}
    for key, value in state.items():
        new = _rename(key, RULES[layout], forward=True)
        if new is None:
            raise ValueError(f"key '{key}' has no counterpart in the '{layout}' reference layout")
        out[new] = value
    if layout in ("jem", "jempp", "sadajem"):
        width = out["class_output.weight"].shape[1]
        out["energy_output.weight"] = torch.zeros(1, width, dtype=out["class_output.weight"].dtype)
        out["energy_output.bias"] = torch.zeros(1, dtype=out["class_output.weight"].dtype)
    if layout == "jem":
        out["f.linear.weight"] = torch.zeros(10, width, dtype=out["class_output.weight"].dtype)
        out["f.linear.bias"] = torch.zeros(10, dtype=out["class_output.weight"].dtype)
    if layout == "jempp":
        for key in list(out):
            if key.startswith("f.conv1."):
                out["f.layer_one." + key[len("f.conv1."):]] = out[key]
            match = re.match(r"^f\.layer(\d+)\.(.+)$", key)
            if match:
                out[f"f.other_layers.{int(match[1]) - 1}.{match[2]}"] = out[key]
            if key.startswith("f.bn1."):
                out["f.other_layers.3." + key[len("f.bn1."):]] = out[key]
    if layout == "trades_wrn":
        for key in list(out):
            if key.startswith("block1."):
                out["sub_block1." + key[len("block1."):]] = out[key].clone()
    return out


def _is_alias(key: str, layout: str) -> bool:
    if layout in ("jem", "jempp", "sadajem") and key.startswith("energy_output."):
        return True
    if layout == "jem" and key.startswith("f.linear."):
        return True
    if layout == "jempp" and (key.startswith("f.layer_one.") or key.startswith("f.other_layers.")):
        return True
    return layout == "trades_wrn" and key.startswith("sub_block1.")


def from_reference(state: dict[str, Tensor], layout: str) -> dict[str, Tensor]:
    """A reference checkpoint's state dict -> our key layout (unused aliases dropped, the rest renamed)."""
    _check_layout(layout)
    out, unknown = {}, []
    for key, value in state.items():
        if _is_alias(key, layout):
            continue
        new = _rename(key, RULES[layout], forward=False)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not part of the '{layout}' reference layout: {unknown[:6]}")
    return out


def detect_layout(keys) -> str | None:
    """The reference layout a set of state-dict keys comes from, or None (ours, or unknown)."""
    keys = set(keys)
    if "class_output.weight" in keys and "f.conv1.weight" in keys:
        if "f.layer_one.weight" in keys:
            return "jempp"
        return "jem" if "f.linear.weight" in keys else "sadajem"
    if "block1.layer.0.conv1.weight" in keys and "fc.weight" in keys:
        return "trades_wrn"
    if "layer4.0.conv1.weight" in keys and "linear.weight" in keys:
        return "resnet18"
    return None
