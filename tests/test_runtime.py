"""Atomic writes, seeding and the fraction parser of params.yaml."""

import json
import os

import pytest
import torch
from pydantic import ValidationError

from robust_ebm.runtime import atomic_torch_save, atomic_write_json, pick_device, seed_everything
from robust_ebm.schema_types import Fraction, Strict


def test_atomic_json_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_json(path, {"b": 1, "a": torch.tensor(0.5)})
    atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(path.parent) == ["out.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert os.listdir(tmp_path) == ["out.json"]


def test_atomic_torch_save_round_trip(tmp_path):
    state = {"w": torch.arange(4.0)}
    atomic_torch_save(state, tmp_path / "x.pt")
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["w"], state["w"])


def test_atomic_torch_save_gives_the_same_bytes_for_the_same_object(tmp_path):
    """data.json's splits_sha256 (and any file hash) must not depend on the temporary file's name."""
    state = {"w": torch.arange(4.0)}
    atomic_torch_save(state, tmp_path / "a.pt")
    atomic_torch_save(state, tmp_path / "other_name.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "other_name.pt").read_bytes()


def test_seed_everything_is_reproducible():
    g1 = seed_everything(3)
    a = torch.rand(3), torch.rand(2, generator=g1)
    g2 = seed_everything(3)
    b = torch.rand(3), torch.rand(2, generator=g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in {"cpu", "cuda"}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            pick_device("cuda")


class _Budget(Strict):
    eps: Fraction


def test_fraction_parses_paper_notation_and_rejects_garbage():
    assert _Budget(eps="8/255").eps == pytest.approx(8 / 255)
    assert _Budget(eps=0.5).eps == 0.5
    assert _Budget(eps="0.25").eps == 0.25
    with pytest.raises(ValidationError, match="fraction"):
        _Budget(eps="eight/255")
    with pytest.raises(ValidationError, match="extra"):
        _Budget(eps=1, other=2)
