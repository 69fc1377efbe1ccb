"""JEAT and PreJEAT equal the paper (no public code): fixtures of tests/golden/gen_jeat.py.

The golden is Algorithm 1 / Eq. 5-7, 17, 18 written out independently in the generator; our side is
methods/jeat.py with params.yaml's `jeat` / `prejeat` settings (attack: uniform start + one signed step of
eps on E(x, y), asserted), the sampler switched to Algorithm 1's coupled SGLD (`coupled: true`; the
params.yaml default is JEM's decoupled step [R]) with the fixture's alpha, K, rho and buffer size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robust_ebm.config import load_params
from robust_ebm.methods import Batch, build_method

from golden import ebjdat_net
from golden.common import TOLERANCE, assert_close, load_fixture

REPO = Path(__file__).resolve().parents[1]
# Our replay buffer stores float32: written rows are the float64 chain rounded to float32 (the fixture
# rounds the same way), compared exactly below; see test_golden_ebjdat.py for the same argument.


def run_ours(name: str) -> dict:
    fx = load_fixture(name)
    inp = fx["inputs"]
    cfg = load_params(REPO / "params.yaml").methods[name]
    assert cfg.attack.eps == pytest.approx(inp["eps"]) and cfg.attack.step == cfg.attack.eps and cfg.attack.steps == 1
    assert cfg.attack.random_start == "uniform" and cfg.attack.objective == "joint_energy"
    if cfg.sampler is not None:
        free = {"coupled": True, "step_size": inp["alpha"], "steps": inp["steps"], "reinit_prob": inp["rho"],
                "buffer_size": inp["buffer_size"]}  # Algorithm 1's free values [R]: the fixture's
        cfg = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(update=free)})
    model = ebjdat_net.build(False)
    model.load_state_dict(inp["state"])
    model.train()
    method = build_method(cfg, num_classes=ebjdat_net.NUM_CLASSES, image_shape=tuple(inp["x"].shape[1:]), stats=None,
                          device="cpu", generator=torch.Generator().manual_seed(int(inp["seed"])))
    if cfg.sampler is not None:  # float64 chains from the float32 rows (exact promotion), like the golden
        buffer = method.sampler.buffer
        draw = buffer.sample
        buffer.sample = lambda n, y=None: (lambda x, idx: (x.double(), idx))(*draw(n, y))
    prepared = method.prepare(model, Batch(x=inp["x"], y=inp["y"]), epoch=0)
    out = method.loss(model, prepared, epoch=0)
    names, params = zip(*model.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(out.loss, params)))
    return {"fx": fx, "prepared": prepared, "loss": out.loss.detach(), "grads": grads,
            "buffer": method.sampler.buffer.buffer if cfg.sampler is not None else None}


@pytest.fixture(scope="module", params=["jeat", "prejeat"])
def step(request):
    return request.param, run_ours(request.param)


def test_energy_adversarial_example(step):
    name, r = step
    ref = r["fx"]["outputs"]
    x_adv, x = r["prepared"]["x_adv"], r["fx"]["inputs"]["x"]
    assert_close(x_adv, ref["x_adv"], what=f"{name} x_adv (Alg. 1 step 1)")
    assert (x_adv - x).abs().max() <= r["fx"]["inputs"]["eps"] + TOLERANCE
    # the [R] clip to [0,1] (after start and step) is a real choice: the literal Algorithm 1 leaves the range
    literal = ref["x_adv_literal"]
    assert literal.min() < 0 and literal.max() > 1 and (x_adv - literal).abs().max() > 1e-3


def test_sgld_chain_and_buffer():
    """JEAT only: PreJEAT has no sampler (CE at the energy adversarial example)."""
    name, r = "jeat", run_ours("jeat")
    ref = r["fx"]["outputs"]
    assert_close(r["prepared"]["x_sgld"], ref["x_sgld"], what=f"{name} x_sgld (Alg. 1 step 2, coupled SGLD)")
    assert torch.equal(r["buffer"], ref["buffer"]), f"{name}: buffer after the write-back differs"


def test_loss_and_gradients(step):
    name, r = step
    ref = r["fx"]["outputs"]
    assert_close(r["loss"], ref["loss"], what=f"{name} loss")
    assert set(r["grads"]) == set(ref["grads"])
    for key, value in ref["grads"].items():
        assert_close(r["grads"][key], value, what=f"{name} grad {key}", tol=TOLERANCE)
