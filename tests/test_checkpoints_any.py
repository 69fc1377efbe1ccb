"""Any reasonable checkpoint evaluates: ours, torchvision models, reference layouts (kuangliu ResNet-18,
TRADES WRN), DataParallel prefixes and wrappers, whole pickles (only with --unsafe-pickle) and RobustBench
names (offline: a fake robustbench package reading a local model directory). Every refusal is one line."""

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn

import robust_ebm.evaluate as ev_mod
from robust_ebm import reference_weights
from robust_ebm.cli import build_parser, main
from robust_ebm.config import TrainingConfig
from robust_ebm.evaluate import evaluate_stage
from robust_ebm.files import BadFileError
from robust_ebm.model_sources import IMAGENET_MEAN, IMAGENET_STD, ModelSource, ModelSourceError
from robust_ebm.models import ModelConfig, build_model, load_for_run
from test_evaluate import _evaluation, _fake_autoattack, _splits

ROOT = Path(__file__).resolve().parents[1]
CLASSES, SIZE = 4, 8
TINY_WRN = ModelConfig(arch="wrn", depth=10, width=1)  # TRADES block layout


class PixelNet(nn.Module):
    """A user's own module class (not ours): flatten -> hidden -> logits, [0,1] pixels in."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 16), nn.ReLU())
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.head(self.body(x))


def _images(n=8, seed=0):
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _run(model_cfg=None):
    """A run on cifar10-shaped data of 4 classes, 3x8x8 images; its own architecture a WRN (not the files');
    every model placed NHWC (training.channels_last), as the mini and paper profiles run them."""
    dataset = SimpleNamespace(num_classes=CLASSES, channels=3, image_size=SIZE)
    return SimpleNamespace(evaluation=_evaluation(pgd={"steps": 1}, energy_attack={"steps": 1},
                                                  ebjdat_scale={"steps": 1}),
                           seed=0, device="cpu", method_name="standard", dataset_name="cifar10", dataset=dataset,
                           model=model_cfg or TINY_WRN.model_copy(update={"depth": 16}),
                           training=TrainingConfig(channels_last=True))


def _evaluate(tmp_path, monkeypatch, model_path, reference, source=None):
    """evaluate_stage on 8 images labelled by `reference` (the network as its authors run it on [0,1] pixels):
    clean accuracy 1 shows the loaded model computes the same decisions; the logits are compared too."""
    x_u8 = _images()
    with torch.no_grad():
        y = reference(x_u8.float() / 255).argmax(1)
    monkeypatch.setattr(ev_mod, "load_prepared", lambda d: (_splits(x_u8, y), None))
    monkeypatch.setattr(ev_mod, "run_autoattack", _fake_autoattack)
    result = evaluate_stage(_run(), tmp_path, model_path, tmp_path / "e.json", source=source)
    assert result["columns"]["clean"]["accuracy"] == 1.0 and result["columns"]["clean"]["n"] == 8
    assert 0.0 <= result["columns"]["pgd"]["accuracy"] <= 1.0
    model, meta = load_for_run(_run(), model_path, source=source)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)  # models.place, NHWC
    x = x_u8.float() / 255
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.fc(model.features(x)), model(x))  # features/fc split kept
    return model, meta


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- torchvision


@pytest.fixture(scope="module")
def torchvision_resnet18():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=CLASSES).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong normalisation would show
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net


def _normalized(net, mean, std):
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return lambda x: net((x - mean) / std)


def test_torchvision_resnet18_state_dict_with_module_prefix_under_model_state_dict(tmp_path, monkeypatch,
                                                                                  torchvision_resnet18):
    net = torchvision_resnet18
    path = tmp_path / "tv.pt"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}, path)
    source = ModelSource(arch="torchvision:resnet18")
    model, meta = _evaluate(tmp_path, monkeypatch, path, _normalized(net, IMAGENET_MEAN, IMAGENET_STD), source)
    assert meta["arch"] == "torchvision:resnet18" and "0.485" in meta["input_normalization"]
    recorded = json.loads((tmp_path / "e.json").read_text())["model_source"]
    assert recorded["arch"] == "torchvision:resnet18" and "0.485" in recorded["input_normalization"]
    # --mean/--std replace the default ImageNet statistics
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    _evaluate(tmp_path, monkeypatch, path, _normalized(net, mean, std), ModelSource(arch="torchvision:resnet18",
                                                                                     mean=mean, std=std))
    # without --arch the run's own architecture is tried: one line that names the likely fix
    with pytest.raises(BadFileError) as err:
        load_for_run(_run(), path)
    assert str(path) in _one_line(err) and "--arch torchvision:resnet18" in str(err.value)


def test_torchvision_refusals_are_one_line(tmp_path, torchvision_resnet18):
    path = tmp_path / "tv.pt"
    torch.save(torchvision_resnet18.state_dict(), path)
    with pytest.raises(ModelSourceError) as err:
        load_for_run(_run(), path, source=ModelSource(arch="torchvision:no_such_net"))
    assert "not a torchvision classification model" in _one_line(err) and "resnet" in str(err.value)
    with pytest.raises(BadFileError) as err:  # keys of another torchvision architecture
        load_for_run(_run(), path, source=ModelSource(arch="torchvision:resnet34"))
    assert str(path) in _one_line(err) and "missing" in str(err.value)
    grey = _run()
    grey.dataset = SimpleNamespace(num_classes=CLASSES, channels=1, image_size=SIZE)
    with pytest.raises(ModelSourceError, match="3-channel"):
        load_for_run(grey, path, source=ModelSource(arch="torchvision:resnet18"))
    with pytest.raises(ModelSourceError, match="--mean and --std go together"):
        ModelSource(mean=(0.5,))
    with pytest.raises(ModelSourceError, match="1 or 3"):
        load_for_run(_run(), path, source=ModelSource(arch="torchvision:resnet18", mean=(0.5, 0.5), std=(1, 1)))


# ---------------------------------------------------------------- reference layouts


def test_kuangliu_resnet18_loads_with_arch_resnet18(tmp_path, monkeypatch):
    """WEAT's / TRADES' kuangliu ResNet-18 keys (conv1, layerN, linear): the run's WRN is refused in one line
    naming --arch resnet18; with it the file evaluates, its 122 tensors renamed onto ours."""
    torch.manual_seed(1)
    ours = build_model(ModelConfig(arch="resnet18"), num_classes=CLASSES, in_channels=3, image_size=SIZE).eval()
    theirs = reference_weights.to_reference(ours.state_dict(), "resnet18")
    assert len(theirs) == 122 and "linear.weight" in theirs and "layer4.1.bn2.running_var" in theirs
    path = tmp_path / "weat_resnet18.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.items()}}, path)
    with pytest.raises(BadFileError) as err:
        load_for_run(_run(), path)
    assert str(path) in _one_line(err) and "--arch resnet18" in str(err.value)
    _, meta = _evaluate(tmp_path, monkeypatch, path, ours, ModelSource(arch=ModelConfig(arch="resnet18")))
    assert meta["reference_layout"] == "resnet18"


def test_a_bare_state_dict_without_any_architecture_is_refused_in_one_line(tmp_path):
    """The metrics stage's reference classifier (own_model=False) has no --arch: it must describe itself."""
    torch.save(build_model(TINY_WRN, num_classes=CLASSES, in_channels=3, image_size=SIZE).state_dict(),
               tmp_path / "bare.pt")
    with pytest.raises(BadFileError) as err:
        load_for_run(_run(), tmp_path / "bare.pt", own_model=False)
    assert "bare.pt" in _one_line(err) and "written by the train stage" in str(err.value)


def test_trades_wrn_layout_loads_with_a_matching_arch(tmp_path, monkeypatch):
    torch.manual_seed(2)
    ours = build_model(TINY_WRN, num_classes=CLASSES, in_channels=3, image_size=SIZE).eval()
    path = tmp_path / "trades.pt"
    torch.save(reference_weights.to_reference(ours.state_dict(), "trades_wrn"), path)
    _, meta = _evaluate(tmp_path, monkeypatch, path, ours, ModelSource(arch=TINY_WRN))
    assert meta["reference_layout"] == "trades_wrn"


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model_state_dict", "model"])
def test_our_layout_state_dict_in_any_wrapper_with_dataparallel_prefix(tmp_path, monkeypatch, wrapper):
    torch.manual_seed(4)
    ours = build_model(TINY_WRN, num_classes=CLASSES, in_channels=3, image_size=SIZE).eval()
    state = {f"module.{k}": v for k, v in ours.state_dict().items()}
    path = tmp_path / "ours.pt"
    torch.save(state if wrapper is None else {wrapper: state, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    _evaluate(tmp_path, monkeypatch, path, ours, ModelSource(arch=TINY_WRN))


# ---------------------------------------------------------------- whole pickles


def test_whole_pickle_needs_the_unsafe_flag(tmp_path, monkeypatch):
    net = PixelNet().eval()
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(BadFileError) as err:
        load_for_run(_run(), path)
    assert str(path) in _one_line(err) and "would run code" in str(err.value) and "--unsafe-pickle" in str(err.value)
    model, meta = _evaluate(tmp_path, monkeypatch, path, net, ModelSource(unsafe_pickle=True))
    assert meta["pickled"] == "PixelNet"
    # a pickle inside a dict, and one of our own Classifier
    torch.save({"model": net, "epoch": 7}, tmp_path / "wrapped.pt")
    _evaluate(tmp_path, monkeypatch, tmp_path / "wrapped.pt", net, ModelSource(unsafe_pickle=True))
    torch.manual_seed(5)
    ours = build_model(TINY_WRN, num_classes=CLASSES, in_channels=3, image_size=SIZE).eval()
    torch.save(ours, tmp_path / "ours_whole.pt")
    loaded, _ = _evaluate(tmp_path, monkeypatch, tmp_path / "ours_whole.pt", ours, ModelSource(unsafe_pickle=True))
    assert type(loaded).__name__ == "Classifier"


def test_whole_pickle_of_other_data_or_unimportable_class_is_refused(tmp_path, monkeypatch):
    gone = types.ModuleType("gone_module")  # a module that is importable when saving, not when loading
    exec("import torch\nclass Net(torch.nn.Linear):\n    pass", gone.__dict__)
    monkeypatch.setitem(sys.modules, "gone_module", gone)
    torch.save(gone.Net(3, CLASSES), tmp_path / "gone.pt")
    monkeypatch.delitem(sys.modules, "gone_module")
    with pytest.raises(BadFileError) as err:
        load_for_run(_run(), tmp_path / "gone.pt", source=ModelSource(unsafe_pickle=True))
    assert "gone.pt" in _one_line(err) and "PYTHONPATH" in str(err.value)

    path = tmp_path / "other.pt"
    big = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 7))
    torch.save(big, path)
    with pytest.raises(BadFileError) as err:
        load_for_run(_run(), path, source=ModelSource(unsafe_pickle=True))
    assert "7 outputs" in _one_line(err) and "4 classes" in str(err.value)
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04\x95junk")
    with pytest.raises(BadFileError) as err:
        load_for_run(_run(), tmp_path / "junk.pt", source=ModelSource(unsafe_pickle=True))
    assert "junk.pt" in _one_line(err)


# ---------------------------------------------------------------- RobustBench (offline)


def _fake_robustbench(monkeypatch, calls):
    """A stand-in `robustbench.utils.load_model` with the real one's disk contract (robustbench 1.1.1
    utils.py:106-211): model_dir/<dataset>/<threat_model>/<name>.pt holding {'state_dict': ...} with
    'module.' prefixes; it builds the zoo's architecture (here PixelNet) and returns it in eval mode."""

    def load_model(model_name, model_dir="./models", dataset="cifar10", threat_model="Linf"):
        calls.append((model_name, model_dir, dataset, threat_model))
        if model_name != "Tiny2024Fake":
            raise KeyError(model_name)
        checkpoint = torch.load(Path(model_dir) / dataset / threat_model / f"{model_name}.pt", map_location="cpu")
        net = PixelNet()
        net.load_state_dict({k.replace("module.", ""): v for k, v in checkpoint["state_dict"].items()})
        return net.eval()

    package, utils = types.ModuleType("robustbench"), types.ModuleType("robustbench.utils")
    utils.load_model, package.utils = load_model, utils
    monkeypatch.setitem(sys.modules, "robustbench", package)
    monkeypatch.setitem(sys.modules, "robustbench.utils", utils)


def test_robustbench_model_from_a_local_model_directory(tmp_path, monkeypatch):
    calls = []
    _fake_robustbench(monkeypatch, calls)
    torch.manual_seed(6)
    net = PixelNet().eval()
    with torch.no_grad():
        net.head.weight.mul_(3)
    folder = tmp_path / "rb" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, folder / "Tiny2024Fake.pt")
    source = ModelSource(robustbench_dir=tmp_path / "rb")
    _, meta = _evaluate(tmp_path, monkeypatch, Path("robustbench:Tiny2024Fake"), net, source)
    assert meta["source"] == "robustbench:Tiny2024Fake"
    assert calls[0] == ("Tiny2024Fake", str(tmp_path / "rb"), "cifar10", "Linf")

    def refused(name, source, error):
        with pytest.raises(error) as err:
            load_for_run(_run(), Path(f"robustbench:{name}"), source=source)
        return _one_line(err)

    assert "--robustbench-dir" in refused("Tiny2024Fake", ModelSource(), ModelSourceError)
    msg = refused("Missing2020", source, BadFileError)
    assert str(tmp_path / "rb" / "cifar10" / "Linf" / "Missing2020.pt") in msg and "load_model" in msg
    assert "Linf2" in refused("Tiny2024Fake", ModelSource(robustbench_dir=tmp_path / "rb", threat_model="Linf2"),
                              BadFileError)
    (folder / "Unknown2021.pt").write_bytes(b"")
    assert "not a RobustBench model" in refused("Unknown2021", source, ModelSourceError)
    monkeypatch.setitem(sys.modules, "robustbench", None)  # the package not installed
    monkeypatch.setitem(sys.modules, "robustbench.utils", None)
    assert "pip install robustbench" in refused("Tiny2024Fake", source, ModelSourceError)
    broken = tmp_path / "site" / "robustbench"  # installed, a dependency missing (robustbench 1.1.1's autoattack)
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ModuleNotFoundError('no autoattack', name='autoattack')\n")
    monkeypatch.delitem(sys.modules, "robustbench")
    monkeypatch.delitem(sys.modules, "robustbench.utils")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert "needs the module 'autoattack'" in refused("Tiny2024Fake", source, ModelSourceError)


# ---------------------------------------------------------------- command line


def _args(*extra):
    return build_parser().parse_args(["evaluate", "--params", str(ROOT / "params.yaml"), "--profile", "smoke",
                                      "--dataset", "digits", "--method", "standard", "--seed", "0", "--data", "d",
                                      "--model", "m.pt", "--out", "e.json", *extra])


def test_command_line_options_build_the_model_source():
    from robust_ebm.cli import _model_source

    source = _model_source(_args("--arch", "resnet18", "--mean", "0.5", "--std", "0.25", "--unsafe-pickle",
                                 "--robustbench-dir", "rb", "--threat-model", "L2"))
    assert source.arch == ModelConfig(arch="resnet18") and source.mean == (0.5,) and source.std == (0.25,)
    assert source.unsafe_pickle and source.robustbench_dir == Path("rb") and source.threat_model == "L2"
    assert _model_source(_args("--arch", "torchvision:resnet18")).arch == "torchvision:resnet18"
    assert _model_source(_args()) == ModelSource()


@pytest.mark.parametrize("extra, expected", [(("--arch", "no_such_key"), "neither a `models` key"),
                                             (("--mean", "0.5"), "--mean and --std go together")])
def test_command_line_refusals_are_one_line(capsys, extra, expected):
    args = ["evaluate", "--params", str(ROOT / "params.yaml"), "--profile", "smoke", "--dataset", "digits",
            "--method", "standard", "--seed", "0", "--data", "d", "--model", "m.pt", "--out", "e.json", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- generate


def test_generate_samples_from_a_torchvision_model(tmp_path, monkeypatch, torchvision_resnet18):
    """SGLD (Eq.17), JEM++'s PYLD (through the identity stem) and targeted PGD run on a wrapped torchvision net."""
    import robust_ebm.generate as gen_mod
    from robust_ebm.config import GenerationConfig
    from robust_ebm.data import DatasetConfig, Splits, TensorSplit, class_stats
    from robust_ebm.generate import generate_stage

    x_u8 = _images(16)
    y = torch.arange(16) % CLASSES
    split = TensorSplit(x_u8, y)
    stats = class_stats(x_u8.float() / 255, y, CLASSES, max_rank=16)
    monkeypatch.setattr(gen_mod, "load_prepared", lambda d: (Splits(split, split, split, list("abcd")), stats))
    path = tmp_path / "tv.pt"
    torch.save({"model": torchvision_resnet18.state_dict()}, path)
    generators = {
        "eq17": {"kind": "sgld", "init": "gaussian", "sampler": {"energy": "joint", "steps": 2, "step_size": 0.01}},
        "pyld": {"kind": "sgld", "init": "uniform", "sampler": {"kind": "pyld", "energy": "marginal", "steps": 1}},
        "pgd": {"kind": "targeted_pgd", "init": "gaussian",
                "attack": {"norm": "l2", "eps": 2.0, "step": 0.5, "steps": 2, "random_start": "none",
                           "objective": "ce", "targeted": True}}}
    from test_generate import smoke_run  # generate keys its resume on the run's settings digest: a real RunConfig

    dataset = DatasetConfig(source="imagefolder", num_classes=CLASSES, channels=3, image_size=SIZE, n_valid=0)
    run = smoke_run().model_copy(update=dict(
        generation=GenerationConfig(n_per_class=2, batch_size=8, generators=generators), method_name="standard",
        seed=0, device="cpu", model=_run().model, dataset_name="cifar10", dataset=dataset))
    report = generate_stage(run, tmp_path, path, tmp_path / "samples", source=ModelSource(arch="torchvision:resnet18"))
    for name in generators:
        assert report["generators"][name]["status"] == "ok", name
        assert report["generators"][name]["count"] == 2 * CLASSES, name


# ---------------------------------------------------------------- metrics

from test_metrics import offline, run_files, small_inception_input  # noqa: E402,F401 - the metrics stage's fixtures


def test_metrics_scores_a_whole_pickled_model_only_with_the_flag(run_files, offline):
    from robust_ebm.metrics import metrics_stage

    run, d = run_files  # 3 classes of 1x8x8 images; model.pt replaced by a pickled torch.nn network
    torch.manual_seed(7)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3)), d / "model.pt")
    files = (d / "data", d / "model.pt", d / "samples", d / "refclf.pt", d / "eval.json", d / "out" / "m.json")
    with pytest.raises(BadFileError, match="--unsafe-pickle"):
        metrics_stage(run, *files)
    result = metrics_stage(run, *files, source=ModelSource(unsafe_pickle=True))
    assert result["fisher"]["n"] == 5 and len(result["generators"]["sgld"]["refclf"]) > 1
