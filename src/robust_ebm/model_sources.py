"""Networks from elsewhere: torchvision architectures, RobustBench model names, whole pickled models.

`evaluate`, `generate` and `metrics` read `--model` with these options (`ModelSource`):

    --arch KEY                 a `models` key of params.yaml: the architecture of a bare state dict, in our
                               layout or a reference one (JEM, JEM++, SADA-JEM, TRADES WRN, kuangliu ResNet-18)
    --arch torchvision:NAME    torchvision.models.get_model(NAME, weights=None, num_classes=K), then the file's
                               state dict; inputs normalised with ImageNet's mean/std unless --mean/--std
    --model robustbench:NAME   robustbench.utils.load_model(NAME, model_dir=--robustbench-dir, dataset,
                               threat_model): reads DIR/<dataset>/<threat_model>/NAME.pt, never downloads here
    --mean M.. --std S..       the normalisation (x - mean) / std the network applies to [0,1] pixels
    --unsafe-pickle            torch.load(weights_only=False): a whole pickled model; RUNS CODE from the file

A foreign network g (torchvision, RobustBench, a pickled module) joins this package's `Classifier`
interface as normalize -> stem = identity -> trunk = g with its last nn.Linear replaced by the
identity -> fc = that layer (`split_head`), checked on a probe batch to give g's own logits, so
attacks, energies and samplers see exactly g. Attack budgets stay in pixel units on [0,1] images.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .files import BadFileError

TORCHVISION = "torchvision:"
ROBUSTBENCH = "robustbench:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet weights (transforms of every classification model)
IMAGENET_STD = (0.229, 0.224, 0.225)
ROBUSTBENCH_INSTALL = "pip install robustbench"


class ModelSourceError(ValueError):
    """An --arch / --mean / --std / robustbench option that cannot be honoured; the message says the fix."""


@dataclass(frozen=True)
class ModelSource:
    """How to read --model. `arch`: a ModelConfig (a params `models` entry), 'torchvision:NAME', or None
    (the run's own architecture). mean/std: the network's input normalisation (None: its own)."""

    arch: Any = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    unsafe_pickle: bool = False
    robustbench_dir: Path | None = None
    robustbench_dataset: str | None = None
    threat_model: str = "Linf"

    def __post_init__(self):
        if (self.mean is None) != (self.std is None):
            raise ModelSourceError("--mean and --std go together: pass both (one value, or one per channel)")
        if self.std is not None and min(self.std) <= 0:
            raise ModelSourceError(f"--std must be positive, got {list(self.std)}")
        if isinstance(self.arch, str) and not torchvision_name(self.arch):
            raise ModelSourceError(f"arch '{self.arch}' is not of the form torchvision:NAME")


def torchvision_name(arch) -> str | None:
    """'torchvision:resnet18' -> 'resnet18'; anything else -> None."""
    if isinstance(arch, str) and arch.startswith(TORCHVISION) and len(arch) > len(TORCHVISION):
        return arch[len(TORCHVISION):]
    return None


def robustbench_name(model) -> str | None:
    """'robustbench:Carmon2019Unlabeled' (a --model value, str or Path) -> 'Carmon2019Unlabeled'; a file -> None."""
    text = str(model)
    return text[len(ROBUSTBENCH):] if text.startswith(ROBUSTBENCH) and len(text) > len(ROBUSTBENCH) else None


def is_model_available(model) -> bool:
    """--model names an existing file or a RobustBench model (checked when it loads)."""
    return robustbench_name(model) is not None or Path(model).is_file()


class Normalize(nn.Module):
    """[0,1] pixels -> (x - mean) / std per channel (buffers not saved: state dicts keep their keys)."""

    def __init__(self, mean, std, channels: int):
        super().__init__()
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, channels):
                raise ModelSourceError(f"--{name} has {len(values)} values; give 1 or {channels} (one per channel)")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def normalization(source: ModelSource | None, channels: int, default=None) -> nn.Module | None:
    """The Normalize module --mean/--std ask for, else `default` ((mean, std) or None: keep the network's)."""
    pair = (source.mean, source.std) if source is not None and source.mean is not None else default
    return None if pair is None else Normalize(*pair, channels)


def split_head(net: nn.Module, probe: Tensor, what: str) -> tuple[nn.Module, nn.Linear]:
    """net -> (net with its last nn.Linear replaced by the identity, that layer), so fc(trunk(x)) = net(x).

    Checked on `probe`: a network whose last Linear is not its final operation is refused.
    """
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelSourceError(f"{what} has no nn.Linear layer, so its logits cannot be split into features and a "
                               "last layer; pass a classifier that ends in nn.Linear")
    name, fc = linears[-1]
    net.eval()
    try:
        with torch.no_grad():
            expected = net(probe)
    except RuntimeError as err:
        raise ModelSourceError(f"{what} cannot run on {tuple(probe.shape[1:])} images "
                               f"({' '.join(str(err).split())[:160]}); pick an architecture for this image size"
                               ) from None
    parent_name, _, child = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, child, nn.Identity())
    with torch.no_grad():
        got = fc(net(probe))
    if not isinstance(expected, Tensor) or got.shape != expected.shape or not torch.allclose(got, expected,
                                                                                            rtol=1e-4, atol=1e-5):
        setattr(parent, child, fc)
        raise ModelSourceError(f"{what}: its last nn.Linear layer '{name}' is not its final operation, so its "
                               "logits are not fc(features(x)); pass a network whose output is that layer's")
    return net, fc


def torchvision_network(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """A randomly initialised torchvision classification model with `num_classes` outputs."""
    import torchvision

    name = torchvision_name(arch)
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(str(name), known, n=4) or ["resnet18", "resnet50", "wide_resnet50_2"]
        raise ModelSourceError(f"'{arch}' is not a torchvision classification model; use e.g. "
                               f"{', '.join(TORCHVISION + c for c in close)} (all: torchvision.models.list_models())")
    if in_channels != 3:
        raise ModelSourceError(f"torchvision models take 3-channel images, the data set has {in_channels}; "
                               "use a `models` key of params.yaml with --arch instead")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _robustbench_load_model():
    """robustbench.utils.load_model, or a one-line error naming the install command."""
    try:
        from robustbench.utils import load_model
    except ImportError as err:
        if (err.name or "robustbench").split(".")[0] == "robustbench":
            raise ModelSourceError(f"robustbench:NAME models need the robustbench package; {ROBUSTBENCH_INSTALL}"
                                   ) from None
        # robustbench 1.1.1 imports `autoattack` (fra31/auto-attack), which PyPI's pyautoattack does not provide
        raise ModelSourceError(f"robustbench is installed but cannot be imported: it needs the module '{err.name}' "
                               f"({err}); install it as robustbench's README says (for autoattack: "
                               "pip install git+https://github.com/fra31/auto-attack)") from None
    return load_model


def robustbench_network(name: str, model_dir, dataset: str, threat_model: str) -> nn.Module:
    """RobustBench's model NAME from its local model directory (no download: the file must be there).

    robustbench.utils.load_model(NAME, model_dir, dataset, threat_model) reads
    model_dir/<dataset>/<threat_model>/NAME.pt (ensembles: NAME.pt_m0.pt, NAME.pt_m1.pt, ...).
    Checked against robustbench 1.1.1 (utils.py:106-211) with Wong2020Fast and Carmon2019Unlabeled:
    the wrapped model's logits equal load_model's exactly. Models robustbench serves through timm's hub
    have no such file and are refused here (offline).
    """
    if model_dir is None:
        raise ModelSourceError(f"--model robustbench:{name} needs --robustbench-dir DIR, the folder robustbench "
                               f"downloaded into (it reads DIR/{dataset}/{threat_model}/{name}.pt)")
    load_model = _robustbench_load_model()
    expected = Path(model_dir) / dataset / threat_model / f"{name}.pt"
    if not expected.is_file() and not Path(f"{expected}_m0.pt").is_file():
        raise BadFileError(f"no RobustBench checkpoint at {expected}; on a machine with internet run "
                           f"robustbench.utils.load_model('{name}', model_dir='DIR', dataset='{dataset}', "
                           f"threat_model='{threat_model}') and copy DIR here")
    try:
        net = load_model(name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
    except KeyError:
        raise ModelSourceError(f"'{name}' is not a RobustBench model for {dataset} / {threat_model}; see "
                               "robustbench's model zoo for the names") from None
    except Exception as err:  # noqa: BLE001 - robustbench raises many kinds; one line names the file
        raise BadFileError(f"robustbench could not load {expected} ({type(err).__name__}: "
                           f"{' '.join(str(err).split())[:160]}); check the file, or re-download it") from None
    if not isinstance(net, nn.Module):
        raise BadFileError(f"robustbench returned a {type(net).__name__} for '{name}', not a network")
    return net
