"""Golden fixtures of the JEM family: architectures, JEM / JEM++ / SADA-JEM training steps, inits.

Run: python -m tests.golden.make_golden --refs /work/refs --only jem

Every reference function runs as released, in float64 on the CPU, with these minimal patches
(each fixture's `note` repeats the ones it needed):
- `F.avg_pool2d(out, 8)` (or 4) of the reference nets is replaced by a global average pool for the
  small images (12x12, 8x8) of the block-by-block comparison; a second 32x32 input runs the
  unpatched pool and checks the logits.
- the reference's torch RNG calls (`t.randint`, `t.rand`, `t.randn_like`, `np.random.randint`,
  MultivariateNormal sampling) return stored tensors (`_Rng`), which our code receives through
  its generator-free seams (buffer indices, reinit mask, fresh draws, Langevin noise).
- stubs for imports no fixture uses: tensorboardX, GPUtil.
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path

import matplotlib.pyplot  # noqa: F401  imported once here: Reference.load drops every module first
import numpy as np  # noqa: F401          imported during a load, and torch/torchvision cannot be imported twice
import torch
import torch.nn.functional as F
import torchvision  # noqa: F401
import tqdm  # noqa: F401

from tests.golden import nets
from tests.golden.common import float64, save_fixture, stub_module

from robust_ebm import reference_weights

REPOSITORIES = ("wgrathwohl/JEM", "sndnyang/JEMPP", "sndnyang/SADAJEM", "yaodongyu/TRADES")

STUBS = {"tensorboardX": stub_module("tensorboardX", SummaryWriter=object), "GPUtil": stub_module("GPUtil")}
POOL_NOTE = "F.avg_pool2d replaced by a global average pool for the small-image block comparison only"


def _global_pool_functional():
    """torch.nn.functional with avg_pool2d(out, k) -> global average pool (small images)."""
    ns = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    ns.avg_pool2d = lambda out, kernel: F.adaptive_avg_pool2d(out, 1)
    return ns


@contextlib.contextmanager
def _patched(module, **attrs):
    old = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


# ---------------------------------------------------------------- architectures

def _ref_wrn_jem_blocks(net):
    """JEM / JEM++ / SADA-JEM CCF: f.conv1, f.layer{s}[b]."""
    pairs = [("stem", net.f.conv1)]
    for s in (1, 2, 3):
        pairs += [(f"stage{s}.{j}", b) for j, b in enumerate(getattr(net.f, f"layer{s}"))]
    return pairs


def _ref_trades_blocks(net):
    pairs = [("stem", net.conv1)]
    for s in (1, 2, 3):
        pairs += [(f"stage{s}.{j}", b) for j, b in enumerate(getattr(net, f"block{s}").layer)]
    return pairs


def _ref_resnet_blocks(net):
    pairs = [("stem", net.conv1)]
    for s in (1, 2, 3, 4):
        pairs += [(f"stage{s}.{j}", b) for j, b in enumerate(getattr(net, f"layer{s}"))]
    return pairs


def _arch_fixture(name, ref, relpath, function, cfg, layout, build_ref, ref_input, ref_pool_module, ref_blocks,
                  ref_logits, *, small: int, n_small: int, extra_note: str = ""):
    """Load our formula weights into the reference class; compare every block and the logits."""
    with float64():
        ours = nets.build(cfg, image_size=small)
        reference = build_ref()
        ref_state = reference_weights.to_reference(ours.state_dict(), layout)
        reference.load_state_dict(ref_state, strict=True)
        x_small, x32 = nets.images(n_small, small, seed=1), nets.images(2, 32, seed=2)
        outputs = {}
        for mode in (("eval", "train") if cfg.norm == "batch" else ("eval",)):
            reference.load_state_dict(ref_state, strict=True)   # fresh running statistics
            reference.train(mode == "train")
            captured, handles = nets.capture(ref_blocks(reference))
            with torch.no_grad(), _patched(ref_pool_module, F=_global_pool_functional()):
                logits = ref_logits(reference, ref_input(x_small))
            for h in handles:
                h.remove()
            if mode == ("train" if cfg.norm == "batch" else "eval"):   # BN nets: the batch-statistics pass
                outputs["blocks"], outputs["blocks_mode"] = captured, mode
            outputs[f"logits_small_{mode}"] = logits
            if mode == "train":
                outputs["running_after_train_forward"] = {
                    k: v.clone() for k, v in reference_weights.from_reference(reference.state_dict(), layout).items()
                    if k.endswith(("running_mean", "running_var"))}
        reference.load_state_dict(ref_state, strict=True)
        reference.eval()
        with torch.no_grad():
            outputs["logits_32_eval"] = ref_logits(reference, ref_input(x32))   # unpatched pooling
        outputs["reference_keys"] = sorted(ref_state)
        outputs["reference_shapes"] = {k: list(v.shape) for k, v in ref_state.items()}
    return save_fixture(
        f"arch_{name}", source=ref.source(relpath, function),
        inputs={"model_config": cfg.model_dump(), "layout": layout, "x_small": x_small, "x32": x32,
                "weight_digest": nets.weight_digest(ours)},
        outputs=outputs, note=f"{POOL_NOTE}. {extra_note}".strip())


def generate_architectures(refs) -> list[Path]:
    out = []
    jem = refs["wgrathwohl/JEM"]
    with float64():
        jem_train = jem.load("train_wrn_ebm.py", stubs=STUBS)
    out.append(_arch_fixture(
        "wrn_jem", jem, "wideresnet.py", "Wide_ResNet / wide_basic via train_wrn_ebm.CCF.classify", nets.JEM_WRN, "jem",
        lambda: jem_train.CCF(16, 1, norm=None, n_classes=10), lambda x: 2 * x - 1, jem_train.wideresnet,
        _ref_wrn_jem_blocks, lambda net, x: net.classify(x), small=12, n_small=2))

    jempp = refs["sndnyang/JEMPP"]
    with float64():
        jempp_train = jempp.load("train_jempp.py", stubs=STUBS)
    jempp_models = jempp_train.get_model_and_buffer.__globals__
    out.append(_arch_fixture(
        "wrn_jempp", jempp, "models/wideresnet_yopo.py", "Wide_ResNet / wide_basic via models/jem_models.CCF(model='yopo')",
        nets.JEMPP_WRN, "jempp",
        lambda: jempp_models["CCF"](16, 1, norm="batch", n_classes=10, model="yopo"), lambda x: 2 * x - 1,
        jempp_models["wideresnet_yopo"], _ref_wrn_jem_blocks, lambda net, x: net.classify(x), small=12, n_small=2))

    sada = refs["sndnyang/SADAJEM"]
    with float64():
        sada_train = sada.load("train_sadajem.py", stubs=STUBS)
    sada_models = sada_train.get_model_and_buffer.__globals__
    out.append(_arch_fixture(
        "wrn_sadajem", sada, "models/wideresnet.py", "Wide_ResNet / wide_basic via models/jem_models.CCF(model='wrn')",
        nets.JEMPP_WRN, "sadajem",
        lambda: sada_models["CCF"](16, 1, norm="batch", n_classes=10, model="wrn"), lambda x: 2 * x - 1,
        sada_models["wideresnet"], _ref_wrn_jem_blocks, lambda net, x: net.classify(x), small=12, n_small=2))

    trades = refs["yaodongyu/TRADES"]
    with float64():
        trades_wrn = trades.load("models/wideresnet.py")
        trades_resnet = trades.load("models/resnet.py")
    out.append(_arch_fixture(
        "wrn_trades", trades, "models/wideresnet.py", "WideResNet / BasicBlock (same file in MART and MAIL)",
        nets.TRADES_WRN, "trades_wrn", lambda: trades_wrn.WideResNet(depth=16, num_classes=10, widen_factor=1),
        lambda x: x, trades_wrn, _ref_trades_blocks, lambda net, x: net(x), small=12, n_small=2))
    out.append(_arch_fixture(
        "resnet18", trades, "models/resnet.py", "ResNet18 (kuangliu; same classes in MART and MAIL resnet.py)",
        nets.RESNET18, "resnet18", lambda: trades_resnet.ResNet18(), lambda x: x, trades_resnet,
        _ref_resnet_blocks, lambda net, x: net(x), small=8, n_small=2))
    return out


def generate(refs) -> list[Path]:
    return generate_architectures(refs)
