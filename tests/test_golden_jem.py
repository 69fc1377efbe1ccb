"""JEM family against golden fixtures made by the official code (tests/golden/gen_jem.py).

Architectures: our formula weights, renamed by `reference_weights.to_reference`, were loaded
strictly into the reference classes (JEM wideresnet.py, JEM++ wideresnet_yopo.py, SADA-JEM
models/wideresnet.py, TRADES wideresnet.py, kuangliu resnet.py); every block's output, the logits
(train and eval mode for BatchNorm nets) and the running statistics must agree to 1e-8.
"""

from __future__ import annotations

import pytest
import torch

from golden import nets
from golden.common import assert_close, load_fixture
from robust_ebm import reference_weights
from robust_ebm.models import ModelConfig

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
                assert_close(captured[block], value, what=f"{name} {block} output ({mode})")
        if mode == "train":
            state = model.state_dict()
            for key, value in out["running_after_train_forward"].items():
                assert_close(state[key], value, what=f"{name} {key} after one train-mode forward")
    model.load_state_dict(fresh)
    model.eval()
    with torch.no_grad():
        assert_close(model(inp["x32"]), out["logits_32_eval"], what=f"{name} 32x32 logits (reference pooling unpatched)")


def test_jem_block_differs_from_trades_block():
    """The two layouts are different functions of the same weights (the first block of a stage)."""
    jem = nets.build(nets.JEM_WRN, image_size=12)
    trades = nets.build(nets.JEM_WRN.model_copy(update={"block": "trades"}), image_size=12)
    x = nets.images(2, 12, seed=3)
    with torch.no_grad():
        assert (jem(x) - trades(x)).abs().max() > 1e-3


def test_reference_checkpoint_loads(tmp_path):
    """A JEM checkpoint ({'model_state_dict', 'replay_buffer'}) loads through load_classifier."""
    from robust_ebm.models import load_classifier

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
