"""JEM family against golden fixtures made by the official code (tests/golden/gen_jem.py).

Architectures: our formula weights, renamed by `reference_weights.to_reference`, were loaded
strictly into the reference classes (JEM wideresnet.py, JEM++ wideresnet_yopo.py, SADA-JEM
models/wideresnet.py, TRADES wideresnet.py, kuangliu resnet.py); every block's output, the logits
(train and eval mode for BatchNorm nets) and the running statistics must agree to 1e-8.
Training steps: our methods with params.yaml's paper settings, fed the reference's stored random
draws, reproduce the chain, the buffer, the loss, every gradient and the BN statistics.
Inits: the class Gaussians' parameters of JEM++ / SADA-JEM. Provenance: docs/provenance_jem.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from golden import nets
from golden.common import assert_close, load_fixture
from robust_ebm import reference_weights, sampling
from robust_ebm.config import load_params
from robust_ebm.data import class_stats
from robust_ebm.methods import Batch, build_method
from robust_ebm.models import ModelConfig, load_classifier
from robust_ebm.optim import build_optimizer
from robust_ebm.train import train_step

ARCHITECTURES = ["wrn_jem", "wrn_jempp", "wrn_sadajem", "wrn_trades", "resnet18"]


def _model(fixture):
    cfg = ModelConfig(**fixture["inputs"]["model_config"])
    model = nets.build(cfg, image_size=fixture["inputs"]["x_small"].shape[-1])
    assert_close(nets.weight_digest(model), fixture["inputs"]["weight_digest"], what="formula weights (drifted?)")
    return cfg, model


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_key_mapping_round_trip(name):
    fixture = load_fixture(f"arch_{name}")
    _, model = _model(fixture)
    layout, out = fixture["inputs"]["layout"], fixture["outputs"]
    ref_state = reference_weights.to_reference(model.state_dict(), layout)
    assert sorted(ref_state) == out["reference_keys"]
    assert {k: list(v.shape) for k, v in ref_state.items()} == out["reference_shapes"]
    assert reference_weights.detect_layout(ref_state) == layout
    back = reference_weights.from_reference(ref_state, layout)
    assert back.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architecture_matches_reference(name):
    fixture = load_fixture(f"arch_{name}")
    cfg, model = _model(fixture)
    inp, out = fixture["inputs"], fixture["outputs"]
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    modes = ("eval", "train") if cfg.norm == "batch" else ("eval",)
    for mode in modes:
        model.load_state_dict(fresh)
        model.train(mode == "train")
        captured, handles = nets.capture(nets.our_blocks(model))
        with torch.no_grad():
            logits = model(inp["x_small"])
        for h in handles:
            h.remove()
        assert_close(logits, out[f"logits_small_{mode}"], what=f"{name} logits ({mode})")
        if mode == out["blocks_mode"]:
            assert captured.keys() == out["blocks"].keys()
            for block, value in out["blocks"].items():
                assert_close(captured[block][:1], value, what=f"{name} {block} output ({mode}, first image)")
        if mode == "train":
            state = model.state_dict()
            for key, value in out["running_after_train_forward"].items():
                assert_close(state[key], value, what=f"{name} {key} after one train-mode forward")
    model.load_state_dict(fresh)
    model.eval()
    with torch.no_grad():
        assert_close(model(inp["x32"]), out["logits_32_eval"], what=f"{name} 32x32 logits (reference pooling unpatched)")


def test_key_mapping_rejects_foreign_keys_and_leaves_ours_alone():
    model = nets.build(nets.TRADES_WRN, image_size=12)
    assert reference_weights.detect_layout(model.state_dict()) is None
    with pytest.raises(ValueError, match="not part of the 'jem' reference layout"):
        reference_weights.from_reference({"f.conv1.weight": torch.zeros(1), "head.weight": torch.zeros(1)}, "jem")
    with pytest.raises(ValueError, match="unknown reference layout"):
        reference_weights.to_reference(model.state_dict(), "vgg")


def test_jem_block_differs_from_trades_block():
    """The two layouts are different functions of the same weights (the first block of a stage)."""
    jem = nets.build(nets.JEM_WRN, image_size=12)
    trades = nets.build(nets.JEM_WRN.model_copy(update={"block": "trades"}), image_size=12)
    x = nets.images(2, 12, seed=3)
    with torch.no_grad():
        assert (jem(x) - trades(x)).abs().max() > 1e-3


def test_reference_checkpoint_loads(tmp_path):
    """A JEM checkpoint ({'model_state_dict', 'replay_buffer'}) loads through load_classifier."""
    model = nets.build(nets.JEM_WRN, image_size=12).float()
    ref_state = reference_weights.to_reference(model.state_dict(), "jem")
    torch.save({"model_state_dict": ref_state, "replay_buffer": torch.zeros(2, 3, 12, 12)}, tmp_path / "jem.pt")
    loaded, meta = load_classifier(tmp_path / "jem.pt", model_config=nets.JEM_WRN, num_classes=10, in_channels=3,
                                   image_size=12)
    assert meta["reference_layout"] == "jem"
    x = nets.images(2, 12, seed=4).float()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(ValueError, match="block 'jem'"):
        load_classifier(tmp_path / "jem.pt", model_config=nets.JEM_WRN.model_copy(update={"block": "trades"}),
                        num_classes=10, in_channels=3, image_size=12)


# ---------------------------------------------------------------- training steps

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


class StoredDraws:
    """Replaces sampling._randint/_rand/_randn: each call returns the next stored tensor of its kind."""

    def __init__(self, **queues):
        self.queues = {k: list(v) for k, v in queues.items()}

    def __call__(self, kind):
        def draw(*args, **kwargs):
            shape = args[1] if kind == "randint" else args[0]
            value = self.queues[kind].pop(0)
            assert tuple(value.shape) == tuple(shape), f"{kind}: stored {tuple(value.shape)}, drawn {tuple(shape)}"
            return value.clone()
        return draw

    def assert_used(self):
        assert not any(self.queues.values()), {k: len(v) for k, v in self.queues.items() if v}


def _inject(monkeypatch, inputs):
    reinit = inputs["reinit_u"] < inputs["reinit_prob"]
    draws = StoredDraws(randint=[inputs["buffer_idx"]], rand=[inputs["reinit_u"], inputs["fresh"][reinit]],
                        randn=list(inputs.get("langevin_noise", [])))
    for kind in ("randint", "rand", "randn"):
        monkeypatch.setattr(sampling, f"_{kind}", draws(kind))
    return draws


def _method_and_model(fixture, method_key, monkeypatch):
    """Our model (formula weights) and method with params.yaml's paper settings of `method_key` on CIFAR-10;
    only the chain length, buffer size and restart rate are the fixture's, and the restart draws come
    from the stored U(0,1) images (init 'uniform': the init distributions have their own fixtures)."""
    inp = fixture["inputs"]
    model = nets.build(ModelConfig(**inp["model_config"]), num_classes=inp["num_classes"], image_size=nets.METHOD_SIZE)
    assert_close(nets.weight_digest(model), inp["weight_digest"], what="formula weights (drifted?)")
    profile = load_params(PARAMS).profile_config("paper")
    cfg = profile.method("cifar10", method_key)
    ours, theirs = profile.models[cfg.model], ModelConfig(**inp["model_config"])
    for field in ("arch", "norm", "bn_momentum", "activation", "input_range", "block", "dropout"):
        assert getattr(ours, field) == getattr(theirs, field), f"params.yaml model {cfg.model}.{field}"
    sampler_cfg = cfg.sampler.model_copy(update={"steps": inp["steps"], "buffer_size": len(inp["buffer"]),
                                                 "reinit_prob": inp["reinit_prob"], "init": "uniform"})
    cfg = cfg.model_copy(update={"sampler": sampler_cfg})
    shape = tuple(inp["buffer"].shape[1:])
    method = build_method(cfg, num_classes=inp["num_classes"], image_shape=shape, stats=None, device="cpu",
                          generator=torch.Generator().manual_seed(0))
    buffer = sampling.ReplayBuffer.from_config(sampler_cfg, shape=shape, num_classes=inp["num_classes"],
                                               storage="float64")
    buffer.buffer.copy_(inp["buffer"])
    method.sampler.buffer = buffer
    _inject_draws = _inject(monkeypatch, inp)
    return model.train(), method, cfg, _inject_draws


def _compare_record(ours: dict, stored: dict, what: str):
    record = nets.grad_record(ours)
    assert record.keys() == stored.keys(), f"{what}: parameters differ"
    for key, value in stored.items():
        assert_close(record[key], value, what=f"{what} {key}")


def _compare_step(out, prepared, method, fixture, model):
    ref = fixture["outputs"]
    assert_close(prepared["x_sgld"], ref["x_sgld"], what="chain x_K (pixels)")
    assert_close(method.sampler.buffer.buffer, ref["buffer_after"], what="replay buffer after write-back")
    assert_close(out.loss, ref["loss"], what="loss")
    assert_close(out.terms["px"], ref["px"], what="p(x) term", tol=1e-6)   # terms are logged as float32
    assert_close(out.terms["ce"], ref["ce"], what="CE term", tol=1e-6)
    model.zero_grad()
    out.loss.backward()
    _compare_record({k: p.grad for k, p in model.named_parameters()}, ref["grads"], "gradient")


@pytest.mark.parametrize("method_key, name", [("jem", "jem_step"), ("jempp", "jempp_step")])
def test_training_step_matches_reference(method_key, name, monkeypatch):
    """JEM: PCD-SGLD; JEM++: PYLD with BN in train mode, x_px forwarded before sampling (plc alltrain1)."""
    fixture = load_fixture(name)
    model, method, _, draws = _method_and_model(fixture, method_key, monkeypatch)
    inp = fixture["inputs"]
    batch = Batch(x=inp["x"], y=inp["y"], x_px=inp["x_px"])
    prepared = method.prepare(model, batch, epoch=0)
    out = method.loss(model, prepared, epoch=0)
    draws.assert_used()
    _compare_step(out, prepared, method, fixture, model)
    if "bn_after" in fixture["outputs"]:
        state = model.state_dict()
        for key, value in fixture["outputs"]["bn_after"].items():
            assert_close(state[key], value, what=f"BN {key} after the step")


def test_sadajem_sam_step_matches_reference(monkeypatch):
    """SADA-JEM: noise-free clipped SGLD, the first and second SAM passes (sam.py), the update, BN stats."""
    fixture = load_fixture("sadajem_step")
    model, method, cfg, draws = _method_and_model(fixture, "sadajem", monkeypatch)
    inp, ref = fixture["inputs"], fixture["outputs"]
    settings = inp["settings"]
    assert (cfg.optim.lr, cfg.optim.sam_rho, cfg.optim.sam_adaptive, cfg.optim.weight_decay) == (
        settings["lr"], settings["rho"], settings["adaptive"], settings["weight_decay"])
    optimizer = build_optimizer(model.parameters(), cfg.optim, device=torch.device("cpu"))
    grads = {}
    for step in ("first_step", "second_step"):
        original = getattr(optimizer, step)

        def recorded(step=step, original=original):
            grads[step] = {k: p.grad.clone() for k, p in model.named_parameters()}
            original()
        setattr(optimizer, step, recorded)
    batch = Batch(x=inp["x"], y=inp["y"], x_px=inp["x_px"])
    out = train_step(model, method, optimizer, batch, epoch=0, precision="fp32", device=torch.device("cpu"))
    draws.assert_used()
    assert_close(method.sampler.buffer.buffer, ref["buffer_after"], what="replay buffer after write-back")
    assert_close(method.sampler.buffer.buffer[inp["buffer_idx"]], ref["x_sgld"], what="chain x_K (pixels)")
    assert_close(out.loss, ref["loss"], what="first-pass loss")
    _compare_record(grads["first_step"], ref["grads"], "first-pass gradient")
    _compare_record(grads["second_step"], ref["grads_second"], "second-pass gradient (at w + e_w)")
    _compare_record(dict(model.named_parameters()), ref["params_after"], "parameters after the SAM step")
    state = model.state_dict()
    for key, value in ref["bn_after"].items():
        assert_close(state[key], value, what=f"BN {key} after the step")


# ---------------------------------------------------------------- informative / Gaussian-mixture init

def test_informative_init_parameters_match_reference():
    """JEM++ category_mean + init_from_centers (= SADA-JEM's mixture components): mean and covariance
    (+1e-4 I) in [-1,1] units equal our ClassStats.gaussian in pixels mapped by x' = 2x - 1."""
    fixture = load_fixture("informative_init")
    inp, ref = fixture["inputs"], fixture["outputs"]
    images, labels = inp["images"], inp["labels"]
    p = nets.probes(images[0].numel())
    stats = class_stats(images.double() / 255, labels, inp["num_classes"], max_rank=4).attach(images, labels)
    for k in range(inp["num_classes"]):
        mean, factor = stats.gaussian(k)
        assert_close(2 * mean - 1, ref["loc"][k], what=f"class {k} mean ([-1,1])")
        cov_diag = 4 * (factor.pow(2).sum(1) + stats.diag_eps)
        cov_probes = 4 * (factor @ (factor.T @ p) + stats.diag_eps * p)
        assert_close(cov_diag, ref["cov_diag"][k], what=f"class {k} covariance diagonal ([-1,1])")
        assert_close(cov_probes, ref["cov_probes"][k], what=f"class {k} covariance @ probes ([-1,1])")
    assert ref["sada_equal"]


def test_informative_init_draws_follow_the_factor(monkeypatch):
    """A draw is clamp(mean_y + A_y z + sqrt(diag_eps) eps, 0, 1) with the stored factor, per label."""
    fixture = load_fixture("informative_init")
    images, labels = fixture["inputs"]["images"], fixture["inputs"]["labels"]
    stats = class_stats(images.double() / 255, labels, 2, max_rank=4).attach(images, labels)
    y = torch.tensor([1, 0, 1])
    g = torch.Generator().manual_seed(0)
    z = {k: torch.randn(int((y == k).sum()), 6, generator=g, dtype=torch.float64) for k in (0, 1)}
    eps = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    draws = StoredDraws(randn=[z[0], z[1], eps])
    monkeypatch.setattr(sampling, "_randn", draws("randn"))
    with torch.no_grad():
        torch.set_default_dtype(torch.float64)
        try:
            x = sampling.initialise("gm", 3, shape=(3, 32, 32), stats=stats, labels=y)
        finally:
            torch.set_default_dtype(torch.float32)
    draws.assert_used()
    for k in (0, 1):
        mean, factor = stats.gaussian(k)
        want = (mean + z[k] @ factor.T).view(-1, 3, 32, 32) + stats.diag_eps ** 0.5 * eps[y == k]
        assert_close(x[y == k], want.clamp(0, 1), what=f"class {k} draws")
