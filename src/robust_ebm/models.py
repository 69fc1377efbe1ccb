"""Classifiers: WRN-d-k, ResNet-18, PreAct ResNet-18 and a tiny CNN, behind one interface.

Every network is a `Classifier`: images in [0,1] -> logits f(x), split as

    forward(x) = fc(features(x)),   features(x) = trunk(stem(normalize(x)))

`normalize` maps [0,1] pixels to the range the network was trained in, so
attack budgets are always in pixel units. `stem` is the first convolution
alone (JEM++'s PYLD sampler differentiates through it). The trunk ends in
adaptive average pooling, so any image size >= 8 works.

Architectures (weights follow the reference code bases):
- `wrn`: Wide ResNet-d-k with pre-activation wide basic blocks
  (Zagoruyko & Komodakis), widths 16, 16k, 32k, 64k, in one of two block layouts (`block`):
  `trades` (TRADES/MART models/wideresnet.py BasicBlock: conv1 strides, the 1x1 shortcut reads
  act(norm(x)), dropout before conv2, convs without bias) or `jem` (JEM wideresnet.py and
  JEM++/SADA-JEM models/wideresnet*.py `wide_basic`: conv2 strides, the 1x1 shortcut reads the raw
  x, dropout right after conv1, every conv with a bias, BatchNorm included).
  `robust_ebm.reference_weights` maps the reference checkpoints' keys onto ours.
- `resnet18`: kuangliu's CIFAR ResNet-18 (3x3 stem, no max-pool, BasicBlocks [2,2,2,2]).
- `preact_resnet18`: PreAct ResNet-18 (He et al. 2016; Rice et al. 2020 with a final norm + activation).
- `tiny_cnn`: three 3x3 convs (width, 2 width, 4 width) for the CPU smoke profile.

Convolutions carry a bias only when no normalisation layer follows
(`norm: none`), except in the `jem` block layout, where every convolution has one (as in the references).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from . import model_sources, reference_weights
from .files import BadFileError, load_torch, load_torch_unsafe
from .runtime import atomic_torch_save
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
    block: Literal["trades", "jem"] = Field("trades", description="WRN block layout (module docstring)")

    @model_validator(mode="after")
    def _check_arch(self):
        if self.arch == "wrn" and (self.depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (e.g. 16, 28, 34, 40), got depth={self.depth}")
        if self.arch != "wrn" and self.dropout > 0:
            raise ValueError(f"dropout is only implemented for arch 'wrn'; set dropout: 0 for arch '{self.arch}'")
        if self.arch != "wrn" and self.block != "trades":
            raise ValueError(f"block '{self.block}' is a WRN block layout; remove `block` for arch '{self.arch}'")
        return self


def architecture_name(cfg: ModelConfig) -> str:
    """The name papers use for the architecture: 'WRN-28-10', 'ResNet-18', 'PreAct ResNet-18', 'tiny CNN'."""
    if cfg.arch == "wrn":
        return f"WRN-{cfg.depth}-{cfg.width}"
    return {"resnet18": "ResNet-18", "preact_resnet18": "PreAct ResNet-18", "tiny_cnn": "tiny CNN"}[cfg.arch]


class Classifier(nn.Module):
    """Images in [0,1] -> logits. forward(x) = fc(features(x))."""

    def __init__(self, normalize: nn.Module, stem: nn.Module, trunk: nn.Module, fc: nn.Linear, *,
                 num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        self.normalize, self.stem, self.trunk, self.fc = normalize, stem, trunk, fc
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.feature_dim = fc.in_features

    def trunk_from_stem(self, h: Tensor) -> Tensor:
        """(B, C, H, W) stem output -> (B, feature_dim) penultimate features."""
        return self.trunk(h)

    def features(self, x: Tensor) -> Tensor:
        return self.trunk_from_stem(self.stem(self.normalize(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class SymmetricRange(nn.Module):
    """[0,1] -> [-1,1]: (x - 0.5) / 0.5, the JEM-family input range."""

    def forward(self, x: Tensor) -> Tensor:
        return (x - 0.5) / 0.5


# ---------------------------------------------------------------- building blocks

def _norm(channels: int, cfg: ModelConfig) -> nn.Module:
    return nn.BatchNorm2d(channels, momentum=cfg.bn_momentum) if cfg.norm == "batch" else nn.Identity()


def _act(cfg: ModelConfig) -> nn.Module:
    # never in-place: with norm 'none' the activation's input is the block input, which the skip path reuses
    return nn.LeakyReLU(0.2) if cfg.activation == "leaky_relu" else nn.ReLU()


def _conv(c_in: int, c_out: int, cfg: ModelConfig, kernel: int = 3, stride: int = 1) -> nn.Conv2d:
    bias = cfg.norm == "none" or cfg.block == "jem"
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=bias)


class PreActBlock(nn.Module):
    """Pre-activation block: out = conv2(act(norm2(drop(conv1(a))))) + skip, a = act(norm1(x)).

    skip = x, or a 1x1 conv of `a` when the shape changes; conv1 strides. With dropout this is
    the `trades` WRN layout (TRADES/MART models/wideresnet.py BasicBlock); without it, PreAct ResNet's block.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.act1 = _norm(c_in, cfg), _act(cfg)
        self.conv1 = _conv(c_in, c_out, cfg, stride=stride)
        self.norm2, self.act2 = _norm(c_out, cfg), _act(cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.conv2 = _conv(c_out, c_out, cfg)
        changes_shape = stride != 1 or c_in != c_out
        self.shortcut = _conv(c_in, c_out, cfg, kernel=1, stride=stride) if changes_shape else None

    def forward(self, x: Tensor) -> Tensor:
        a = self.act1(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        out = self.conv1(a)
        out = self.conv2(self.drop(self.act2(self.norm2(out))))
        return out + skip


class JemBlock(nn.Module):
    """JEM's wide_basic: out = conv2(act(norm2(drop(conv1(act(norm1(x))))))) + skip, conv2 strides.

    skip = x, or a 1x1 strided conv of the raw x when the shape changes (JEM wideresnet.py:42-63,
    JEM++ models/wideresnet_yopo.py:37-58, SADA-JEM models/wideresnet.py). Same parameter names as
    `PreActBlock`; only the wiring differs.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.act1 = _norm(c_in, cfg), _act(cfg)
        self.conv1 = _conv(c_in, c_out, cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.norm2, self.act2 = _norm(c_out, cfg), _act(cfg)
        self.conv2 = _conv(c_out, c_out, cfg, stride=stride)
        changes_shape = stride != 1 or c_in != c_out
        self.shortcut = _conv(c_in, c_out, cfg, kernel=1, stride=stride) if changes_shape else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.drop(self.conv1(self.act1(self.norm1(x))))
        out = self.conv2(self.act2(self.norm2(out)))
        return out + (x if self.shortcut is None else self.shortcut(x))


class BasicBlock(nn.Module):
    """Post-activation ResNet block: act(norm2(conv2(act(norm1(conv1(x))))) + skip(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int, cfg: ModelConfig):
        super().__init__()
        self.conv1, self.norm1, self.act1 = _conv(c_in, c_out, cfg, stride=stride), _norm(c_out, cfg), _act(cfg)
        self.conv2, self.norm2, self.act2 = _conv(c_out, c_out, cfg), _norm(c_out, cfg), _act(cfg)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(_conv(c_in, c_out, cfg, kernel=1, stride=stride), _norm(c_out, cfg))

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


def _stages(block, c_in: int, plan: list[tuple[int, int, int]], cfg: ModelConfig) -> list[tuple[str, nn.Module]]:
    """plan = [(channels, blocks, first stride), ...] -> named nn.Sequential stages."""
    stages = []
    for i, (c_out, n_blocks, stride) in enumerate(plan, start=1):
        blocks = []
        for j in range(n_blocks):
            blocks.append(block(c_in, c_out, stride if j == 0 else 1, cfg))
            c_in = c_out
        stages.append((f"stage{i}", nn.Sequential(*blocks)))
    return stages


def _pool() -> list[tuple[str, nn.Module]]:
    return [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]


def _wrn(cfg: ModelConfig, in_channels: int):
    n, k = (cfg.depth - 4) // 6, cfg.width
    plan = [(16 * k, n, 1), (32 * k, n, 2), (64 * k, n, 2)]
    stem = _conv(in_channels, 16, cfg)
    block = JemBlock if cfg.block == "jem" else PreActBlock
    trunk = _stages(block, 16, plan, cfg) + [("norm", _norm(64 * k, cfg)), ("act", _act(cfg))] + _pool()
    return stem, trunk, 64 * k


def _preact_resnet18(cfg: ModelConfig, in_channels: int):
    plan = [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]
    stem = _conv(in_channels, 64, cfg)
    trunk = _stages(PreActBlock, 64, plan, cfg) + [("norm", _norm(512, cfg)), ("act", _act(cfg))] + _pool()
    return stem, trunk, 512


def _resnet18(cfg: ModelConfig, in_channels: int):
    plan = [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]
    stem = _conv(in_channels, 64, cfg)
    trunk = [("norm", _norm(64, cfg)), ("act", _act(cfg))] + _stages(BasicBlock, 64, plan, cfg) + _pool()
    return stem, trunk, 512


def _tiny_cnn(cfg: ModelConfig, in_channels: int):
    w = cfg.width
    stem = _conv(in_channels, w, cfg)
    trunk = [("norm1", _norm(w, cfg)), ("act1", _act(cfg)),
             ("conv2", _conv(w, 2 * w, cfg, stride=2)), ("norm2", _norm(2 * w, cfg)), ("act2", _act(cfg)),
             ("conv3", _conv(2 * w, 4 * w, cfg, stride=2)), ("norm3", _norm(4 * w, cfg)), ("act3", _act(cfg))]
    return stem, trunk + _pool(), 4 * w


_ARCHS = {"wrn": _wrn, "resnet18": _resnet18, "preact_resnet18": _preact_resnet18, "tiny_cnn": _tiny_cnn}


def build_model(cfg: ModelConfig, *, num_classes: int, in_channels: int, image_size: int) -> Classifier:
    """A freshly initialised `Classifier` (PyTorch default initialisation)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1 (1 for grey, 3 for RGB), got {in_channels}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the trunk downsamples up to 8x), got {image_size}")
    stem, trunk, feature_dim = _ARCHS[cfg.arch](cfg, in_channels)
    normalize = SymmetricRange() if cfg.input_range == "symmetric" else nn.Identity()
    return Classifier(normalize, stem, nn.Sequential(OrderedDict(trunk)), nn.Linear(feature_dim, num_classes),
                      num_classes=num_classes, in_channels=in_channels, image_size=image_size)


# ---------------------------------------------------------------- checkpoints

_SAFE_LEAVES = (str, int, float, bool, type(None), torch.Tensor)


def _check_meta(value, where: str = "meta") -> None:
    """meta must reload under torch.load(weights_only=True): plain containers, numbers, strings, tensors."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}; use string keys")
            _check_meta(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_meta(item, f"{where}[{i}]")
    elif not isinstance(value, _SAFE_LEAVES):
        raise TypeError(f"{where} is a {type(value).__name__}, which torch.load(weights_only=True) refuses; "
                        "convert it to str, int, float, bool, list, dict or a tensor")


CHECKPOINT_FIX = ("rerun the train stage that writes it, or pass a file written by models.save_classifier "
                  "or a state_dict")
PICKLE_FIX = "a whole pickled model from a source you trust loads with --unsafe-pickle (which runs code from the file)"
ARCH_FIX = ("pass the architecture the weights were trained with: --arch with a `models` key of params.yaml or "
            "torchvision:NAME (in Python, model_config=)")
# a `models` key of params.yaml per reference layout, for the error that asks for one
_EXAMPLE_KEY = {"resnet18": "resnet18", "jem": "wrn28_10_jem", "jempp": "wrn28_10_jempp", "sadajem": "wrn28_10_jem",
                "trades_wrn": "wrn34_10"}


class ArchitectureRequired(BadFileError):
    """A checkpoint holds only weights: the caller must name the architecture and data shapes."""


def _describe(cfg) -> str:
    return cfg if isinstance(cfg, str) else f"{architecture_name(cfg)} ({cfg.model_dump(exclude_defaults=True)})"


def wrap_network(net: nn.Module, normalize: nn.Module, *, num_classes: int, in_channels: int, image_size: int,
                 what: str) -> Classifier:
    """A foreign network (torchvision, RobustBench, a pickled module) as a `Classifier` reading normalize(x):
    stem = identity, trunk = net without its last nn.Linear, fc = that layer (model_sources.split_head)."""
    dtype = next(net.parameters()).dtype if any(True for _ in net.parameters()) else torch.float32
    probe = torch.rand(2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    trunk, fc = model_sources.split_head(net, normalize(probe).to(dtype), what)
    if fc.out_features != num_classes:
        raise BadFileError(f"{what} has {fc.out_features} outputs but the data set has {num_classes} classes; "
                           "pass a model trained on this data set")
    return Classifier(normalize, nn.Identity(), trunk, fc, num_classes=num_classes, in_channels=in_channels,
                      image_size=image_size)


def save_classifier(path: str | Path, model: Classifier, cfg: ModelConfig, meta: dict) -> None:
    """Write architecture, shapes, weights and `meta` to `path` atomically (a self-describing checkpoint)."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    _check_meta(meta)
    atomic_torch_save({
        "model_config": cfg.model_dump(),
        "num_classes": model.num_classes,
        "in_channels": model.in_channels,
        "image_size": model.image_size,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta,
    }, path)


def _user_state_dict(payload, path) -> dict[str, Tensor]:
    """A bare state dict, or one nested under a usual key; strips DataParallel / torch.compile prefixes."""
    if isinstance(payload, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not all(isinstance(v, Tensor) for v in payload.values()):
        raise BadFileError(f"{path} holds neither a robust-ebm checkpoint nor a state_dict "
                           f"(a dict of tensors, possibly under 'state_dict', 'model_state_dict' or 'model'); {CHECKPOINT_FIX}")
    state = {}
    for key, value in payload.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        state[key] = value
    return state


def _key_hint(keys) -> str:
    if {"conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "fc.weight"} <= set(keys):
        return " (the keys look like a torchvision ResNet: try --arch torchvision:resnet18)"
    return ""


def _load_weights(model: nn.Module, state: dict[str, Tensor], cfg, path) -> None:
    """Strict load of `state` into `model` (built from `cfg`), or one BadFileError line saying what differs."""
    expected, given = set(model.state_dict()), set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise BadFileError(
            f"{path}: state_dict keys do not match {_describe(cfg)} "
            f"(missing {len(missing)}: {missing[:4]}; unexpected {len(unexpected)}: {unexpected[:4]})"
            f"{_key_hint(given)}; "
            f"{ARCH_FIX}, or rename the keys to that layout")
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
             if v.shape != own[k].shape]
    if wrong:
        raise BadFileError(f"{path}: tensor shapes differ from {_describe(cfg)}: {wrong[:5]}. "
                           f"Check width/depth, num_classes, in_channels; {ARCH_FIX}")
    model.load_state_dict(state)


def place(model: nn.Module, device, channels_last: bool) -> nn.Module:
    """`model` on `device`, its 4-D weights stored NHWC when `channels_last` (`training.channels_last`, every
    stage). oneDNN and cuDNN then pick NHWC kernels without layout reorders: a WRN-16-2 PGD step took
    0.87x the CPU time of NCHW, a TRADES training step 0.88x (docs/profile_jem.md, docs/profile_evaluate.md).
    The layout changes no result beyond float rounding."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def load_for_run(run, path: str | Path, device="cpu", *, own_model: bool = True,
                 source: model_sources.ModelSource | None = None) -> tuple[Classifier, dict]:
    """The classifier in `path` for `run` (a RunConfig) on `device`, in eval mode, parameters frozen.

    The file must fit the run's data set (classes, channels, image size, and the data set named in
    its meta) and, with `own_model`, the run's architecture (`run.model`); a bare state_dict takes
    them. `source` (the command line's --arch, --mean/--std, --unsafe-pickle, --robustbench-*) names
    another architecture or input normalisation, and `path` may be 'robustbench:NAME'
    (`model_sources`). Anything else is refused with one BadFileError line before any work.
    """
    d = run.dataset
    shapes = {"num_classes": d.num_classes, "in_channels": d.channels, "image_size": d.image_size}
    source = source or model_sources.ModelSource()
    name = model_sources.robustbench_name(path)
    if name is not None:
        net = model_sources.robustbench_network(name, source.robustbench_dir,
                                                source.robustbench_dataset or run.dataset_name, source.threat_model)
        model = wrap_network(net, nn.Identity(), what=f"robustbench:{name}", **shapes)
        meta = {"source": f"robustbench:{name}"}
    else:
        arch = source.arch if source.arch is not None else (run.model if own_model else None)
        try:
            model, meta = load_classifier(path, model_config=arch, unsafe_pickle=source.unsafe_pickle, **shapes)
        except ArchitectureRequired:
            if arch is not None:
                raise
            raise ArchitectureRequired(f"{path} holds only weights and names no architecture; pass a model.pt "
                                       "written by the train stage (it describes itself)") from None
    normalize = model_sources.normalization(source, d.channels)
    if normalize is not None:  # --mean/--std replace the network's own input normalisation
        model.normalize = normalize
    meta["input_normalization"] = repr(model.normalize)
    trained_on = meta.get("dataset")
    if isinstance(trained_on, str) and trained_on != run.dataset_name:
        raise BadFileError(f"{path} was trained on data set '{trained_on}', not '{run.dataset_name}'; pass a "
                           f"model trained on '{run.dataset_name}'")
    return place(model, device, run.training.channels_last).eval().requires_grad_(False), meta


def _check_reference_layout(layout: str, cfg, path) -> None:
    arch = "resnet18" if layout == "resnet18" else "wrn"
    block = reference_weights.BLOCK_OF.get(layout, "trades")
    if isinstance(cfg, str) or cfg.arch != arch or cfg.block != block:
        raise BadFileError(f"{path} is a '{layout}' reference checkpoint, not {_describe(cfg)}: pass --arch with a "
                           f"`models` key of arch '{arch}'" + (f", block '{block}'" if arch == "wrn" else "")
                           + f" (e.g. --arch {_EXAMPLE_KEY[layout]}; in Python, model_config=)")


def _pickled_model(net: nn.Module, path, given: dict) -> Classifier:
    """A whole model read with --unsafe-pickle: ours as it is, any other module wrapped (its input: [0,1] pixels)."""
    if isinstance(net, Classifier):
        wrong = [f"{key}={getattr(net, key)}, not {value}" for key, value in given.items()
                 if value is not None and getattr(net, key) != value]
        if wrong:
            raise BadFileError(f"{path} was saved for other data ({'; '.join(wrong)}); pass a model trained "
                               "on this data set")
        return net
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ArchitectureRequired(f"{path} holds a pickled {type(net).__name__}: pass {', '.join(missing)}")
    return wrap_network(net, nn.Identity(), what=f"{path} ({type(net).__name__})", **given)


def load_classifier(path: str | Path, map_location="cpu", *, model_config: ModelConfig | str | None = None,
                    num_classes: int | None = None, in_channels: int | None = None,
                    image_size: int | None = None, unsafe_pickle: bool = False) -> tuple[Classifier, dict]:
    """Load a classifier in eval mode and its meta dict (torch.load with weights_only=True).

    A checkpoint written by `save_classifier` describes itself. A user's own
    checkpoint (only a state_dict) needs its architecture: pass model_config,
    num_classes, in_channels and image_size; meta is then {"source": path}. A checkpoint of the
    official JEM / JEM++ / SADA-JEM / TRADES / MART / MAIL code is recognised by its keys and renamed
    (`reference_weights`); meta then also holds "reference_layout". model_config 'torchvision:NAME'
    builds that torchvision model (inputs normalised with ImageNet's mean/std, `model_sources`).
    `unsafe_pickle` also reads a whole pickled model: UNSAFE, unpickling runs code from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no classifier checkpoint at {path}")
    if unsafe_pickle:
        payload = load_torch_unsafe(path, fix=CHECKPOINT_FIX, map_location=map_location)
    else:
        payload = load_torch(path, fix=f"{CHECKPOINT_FIX}; {PICKLE_FIX}", map_location=map_location)
    given = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    if isinstance(payload, dict) and isinstance(payload.get("model"), nn.Module):  # {'model': net, 'epoch': ...}
        payload = payload["model"]
    if isinstance(payload, nn.Module):  # only torch.load(weights_only=False) returns one
        return _pickled_model(payload, path, given).eval(), {"source": str(path), "pickled": type(payload).__name__}

    if isinstance(payload, dict) and "model_config" in payload and "state_dict" in payload:
        cfg = ModelConfig(**payload["model_config"])
        if model_config is not None and model_config != cfg:
            raise BadFileError(f"{path} is a {_describe(cfg)} checkpoint, not the expected {_describe(model_config)}; "
                               "pass this run's own model file, or --arch naming its architecture")
        shapes = {k: payload[k] for k in given}
        wrong = [f"{key}={shapes[key]}, not {value}" for key, value in given.items()
                 if value is not None and value != shapes[key]]
        if wrong:
            raise BadFileError(f"{path} was saved for other data ({'; '.join(wrong)}); pass a model trained "
                               "on this data set")
        state, meta = payload["state_dict"], payload["meta"]
    else:
        missing = [k for k, v in {"model_config": model_config, **given}.items() if v is None]
        if missing:
            raise ArchitectureRequired(f"{path} holds only weights, so its architecture must be given: pass "
                             f"{', '.join(missing)} (e.g. model_config=ModelConfig(arch='wrn', depth=28, "
                             "width=10), num_classes=10, in_channels=3, image_size=32)")
        cfg, shapes = model_config, given
        state, meta = _user_state_dict(payload, path), {"source": str(path)}
        layout = reference_weights.detect_layout(state)
        if layout is not None:  # a checkpoint of the official code (JEM, JEM++, TRADES, kuangliu ResNet)
            _check_reference_layout(layout, cfg, path)
            state, meta["reference_layout"] = reference_weights.from_reference(state, layout), layout
        if isinstance(cfg, str):  # torchvision:NAME
            net = model_sources.torchvision_network(cfg, num_classes, in_channels)
            _load_weights(net, state, cfg, path)
            normalize = model_sources.Normalize(model_sources.IMAGENET_MEAN, model_sources.IMAGENET_STD, in_channels)
            meta["arch"] = cfg
            return wrap_network(net, normalize, what=f"{path} ({cfg})", **given).eval(), meta

    model = build_model(cfg, **shapes)
    _load_weights(model, state, cfg, path)
    return model.eval(), meta
