"""Classifier architectures, normalisation, and checkpoint round trips."""

import pytest
import torch
from torch import nn

from robust_ebm.models import Classifier, ModelConfig, build_model, load_classifier, save_classifier


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(cfg, **shape):
    """Build a big net without allocating or initialising its weights."""
    with torch.device("meta"):
        return build_model(cfg, **shape)


CIFAR = dict(num_classes=10, in_channels=3, image_size=32)


# ---------------------------------------------------------------- parameter counts from the architecture formula

def bn(c):
    return 2 * c  # weight + bias


def conv(c_in, c_out, k=3):
    return c_in * c_out * k * k  # no bias: a BatchNorm follows


def preact_formula(stem_out, plan, in_ch, classes):
    """Pre-activation nets (WRN, PreAct ResNet): blocks BN-conv-BN-conv (+1x1 conv shortcut), final BN."""
    c_in, total = stem_out, conv(in_ch, stem_out)
    for c_out, n, stride in plan:
        for j in range(n):
            s = stride if j == 0 else 1
            total += bn(c_in) + conv(c_in, c_out) + bn(c_out) + conv(c_out, c_out)
            total += conv(c_in, c_out, 1) if (s != 1 or c_in != c_out) else 0
            c_in = c_out
    return total + bn(c_in) + c_in * classes + classes


def wrn_formula(depth, k, in_ch, classes):
    n = (depth - 4) // 6
    return preact_formula(16, [(16 * k, n, 1), (32 * k, n, 2), (64 * k, n, 2)], in_ch, classes)


def resnet18_formula(in_ch, classes):
    c_in, total = 64, conv(in_ch, 64) + bn(64)
    for c_out, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for j in range(2):
            s = stride if j == 0 else 1
            total += conv(c_in, c_out) + bn(c_out) + conv(c_out, c_out) + bn(c_out)
            total += conv(c_in, c_out, 1) + bn(c_out) if (s != 1 or c_in != c_out) else 0
            c_in = c_out
    return total + 512 * classes + classes


@pytest.mark.parametrize("depth, lo, hi", [(28, 36.0e6, 37.0e6), (34, 45.7e6, 46.7e6)])
def test_wrn_parameter_count(depth, lo, hi):
    model = on_meta(ModelConfig(arch="wrn", depth=depth, width=10), **CIFAR)
    count = n_params(model)
    assert abs(count - wrn_formula(depth, 10, 3, 10)) <= 0.01 * count
    assert lo <= count <= hi


def test_resnet18_parameter_count():
    count = n_params(on_meta(ModelConfig(arch="resnet18"), **CIFAR))
    assert abs(count - resnet18_formula(3, 10)) <= 0.01 * count
    assert 11.1e6 <= count <= 11.25e6


def test_preact_resnet18_parameter_count():
    count = n_params(on_meta(ModelConfig(arch="preact_resnet18"), **CIFAR))
    plan = [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]
    assert count == preact_formula(64, plan, 3, 10)


# ---------------------------------------------------------------- shapes and forward contract

SMALL = [
    ModelConfig(arch="wrn", depth=10, width=1),
    ModelConfig(arch="wrn", depth=10, width=1, norm="none", activation="leaky_relu", dropout=0.3),
    ModelConfig(arch="resnet18"),
    ModelConfig(arch="preact_resnet18"),
    ModelConfig(arch="tiny_cnn", width=4),
]


@pytest.mark.parametrize("cfg", SMALL, ids=lambda c: f"{c.arch}-{c.norm}")
@pytest.mark.parametrize("in_channels, size", [(1, 8), (3, 12)])
def test_shapes_and_features_plus_fc_equals_forward(cfg, in_channels, size):
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=7, in_channels=in_channels, image_size=size).eval()
    x = torch.rand(2, in_channels, size, size)
    logits = model(x)
    assert logits.shape == (2, 7)
    feats = model.features(x)
    assert feats.shape == (2, model.feature_dim)
    torch.testing.assert_close(model.fc(feats), logits)
    torch.testing.assert_close(model.trunk_from_stem(model.stem(model.normalize(x))), feats)
    assert isinstance(model.stem, nn.Conv2d)
    assert (model.num_classes, model.in_channels, model.image_size) == (7, in_channels, size)


def test_symmetric_normalisation_is_applied_inside():
    torch.manual_seed(0)
    unit = build_model(ModelConfig(arch="tiny_cnn", width=4), num_classes=3, in_channels=1, image_size=8).eval()
    sym = build_model(ModelConfig(arch="tiny_cnn", width=4, input_range="symmetric"),
                      num_classes=3, in_channels=1, image_size=8).eval()
    sym.load_state_dict(unit.state_dict())
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(sym(x), unit(2 * x - 1))
    torch.testing.assert_close(sym.normalize(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([-1.0, 0.0, 1.0]))


def test_norm_none_has_no_batchnorm_and_biased_convs():
    model = build_model(ModelConfig(arch="wrn", depth=10, width=1, norm="none"), **CIFAR)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_bn_momentum_is_honoured():
    model = build_model(ModelConfig(arch="tiny_cnn", width=4, bn_momentum=0.9), num_classes=3, in_channels=1, image_size=8)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.9 for m in bns)
    x = torch.rand(8, 1, 8, 8)
    h = model.stem(x)
    model.train()(x)
    first = model.trunk.norm1  # the BN right after the stem; running mean starts at 0
    torch.testing.assert_close(first.running_mean, 0.9 * h.mean(dim=(0, 2, 3)).detach())


def test_bad_configs_fail_early():
    with pytest.raises(ValueError, match="6n\\+4"):
        ModelConfig(arch="wrn", depth=27)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(arch="resnet18", dropout=0.1)
    with pytest.raises(ValueError, match="image_size"):
        build_model(ModelConfig(arch="tiny_cnn"), num_classes=10, in_channels=3, image_size=4)


# ---------------------------------------------------------------- checkpoints

def small_model(input_range="symmetric"):
    cfg = ModelConfig(arch="wrn", depth=10, width=1, input_range=input_range)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=5, in_channels=3, image_size=8)
    model.train()(torch.rand(8, 3, 8, 8))  # move BN running stats away from their defaults
    return cfg, model.eval()


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    cfg, model = small_model()
    path = tmp_path / "model.pt"
    save_classifier(path, model, cfg, {"method": "trades", "epoch": 3, "acc": [0.5, 0.6]})
    loaded, meta = load_classifier(path)
    assert isinstance(loaded, Classifier) and not loaded.training
    assert meta == {"method": "trades", "epoch": 3, "acc": [0.5, 0.6]}
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))


def test_save_rejects_meta_that_weights_only_load_would_refuse(tmp_path):
    cfg, model = small_model()
    with pytest.raises(TypeError, match="meta\\['path'\\]"):
        save_classifier(tmp_path / "m.pt", model, cfg, {"path": tmp_path})
    assert not (tmp_path / "m.pt").exists()


def test_user_state_dict_loading(tmp_path):
    cfg, model = small_model()
    path = tmp_path / "user.pt"
    # a DataParallel-style checkpoint nested under 'state_dict'
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    shape = dict(num_classes=5, in_channels=3, image_size=8)
    loaded, meta = load_classifier(path, model_config=cfg, **shape)
    x = torch.rand(3, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert meta["source"] == str(path)

    with pytest.raises(ValueError, match="model_config"):
        load_classifier(path)
    with pytest.raises(ValueError, match="missing"):
        load_classifier(path, model_config=ModelConfig(arch="tiny_cnn"), **shape)
    with pytest.raises(ValueError, match="shapes differ"):
        load_classifier(path, model_config=cfg, num_classes=7, in_channels=3, image_size=8)


def test_load_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_classifier(tmp_path / "nope.pt")
