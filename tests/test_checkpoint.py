import random

import numpy as np
import pytest
import torch
from torch import nn

from robust_ebm.checkpoint import load_checkpoint, restore, rng_state, save_checkpoint, set_rng_state, snapshot


def draws(gen):
    return (random.random(), float(np.random.rand()), torch.rand(3), torch.rand(2, generator=gen))


def test_rng_roundtrip_through_disk_replays_every_stream(tmp_path):
    gen = torch.Generator().manual_seed(7)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draws(gen)
    np.random.randn()                                   # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state({"g": gen})})
    first = draws(gen)
    draws(gen)                                          # move every stream on
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"], {"g": gen})
    again = draws(gen)
    assert first[:2] == again[:2]
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])


def test_snapshot_restore_model_and_optimizer(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 4)).pow(2).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.pt", snapshot({"model": model, "optimizer": opt}, {}, {"epoch": 3}))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    opt.state.clear()
    progress = restore(load_checkpoint(tmp_path / "c.pt"), {"model": model, "optimizer": opt}, {})
    assert progress == {"epoch": 3}
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert all("momentum_buffer" in s for s in opt.state.values())


def test_restore_names_what_is_missing(tmp_path):
    model = nn.Linear(2, 2)
    ckpt = snapshot({"model": model}, {}, {})
    with pytest.raises(KeyError, match="optimizer"):
        restore(ckpt, {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=1)}, {})
    with pytest.raises(KeyError, match="'g'"):
        set_rng_state(ckpt["rng"], {"g": torch.Generator()})


def test_loaded_with_weights_only(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state({}), "x": torch.ones(2)})
    assert not list(tmp_path.glob(".c.pt.*"))          # atomic: no temporary file left behind
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert torch.equal(raw["x"], torch.ones(2))
