"""EB-JDAT equals the official code: one training step of each fork (fixtures of tests/golden/gen_ebjdat.py).

Our side runs the project's own step (`train.train_step`: EBJDAT.prepare -> loss -> backward -> optimiser,
SAM's second pass with frozen BN) with the method, sampler and optimiser settings of params.yaml
(methods.ebjdat_*), on the tiny net of tests/golden/ebjdat_net.py, from a method generator seeded as the
fixture says: the reference was fed exactly these draws. Only the sizes (buffer 20) and, for the JEM++
and SADA-JEM back-ends, the re-initialisation kind (uniform fresh rows, see gen_ebjdat.py) are changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robust_ebm.config import load_params
from robust_ebm.methods import Batch, build_method
from robust_ebm.optim import SAM, build_optimizer
from robust_ebm.train import train_step

from golden import ebjdat_net
from golden.common import TOLERANCE, assert_close, load_fixture

REPO = Path(__file__).resolve().parents[1]
# The replay buffer stores float32 (sampling.ReplayBuffer): the rows written back are our float64 chain
# rounded to float32, at most half an ulp away, 2^-24 for |x| < 2 ([0,1] images, unclamped JEM chains
# barely leave them). test_buffer_rows_are_the_chain_in_float32 checks that this rounding is the only difference.
BUFFER_TOLERANCE = 2.0**-24 + TOLERANCE
METHODS = ("ebjdat_jem", "ebjdat_jempp", "ebjdat_sadajem")


def to_pixels(x):
    return (x + 1) / 2


def run_ours(name: str) -> dict:
    fx = load_fixture(name)
    inp = fx["inputs"]
    cfg = load_params(REPO / "params.yaml").methods[name]
    sampler = cfg.sampler.model_copy(update={"buffer_size": inp["buffer_size"], "init": "uniform"})
    cfg = cfg.model_copy(update={"sampler": sampler})
    model = ebjdat_net.build(inp["batch_norm"])
    model.load_state_dict(inp["state"])
    model.train()
    method = build_method(cfg, num_classes=ebjdat_net.NUM_CLASSES, image_shape=tuple(inp["x"].shape[1:]), stats=None,
                          device="cpu", generator=torch.Generator().manual_seed(int(inp["seed"])))
    buffer = method.sampler.buffer
    # the chains start from the float32 buffer rows promoted to float64 (exact), to run in float64 like the reference
    draw = buffer.sample
    buffer.sample = lambda n, y=None: (lambda x, idx: (x.double(), idx))(*draw(n, y))
    buffer_before = buffer.buffer.double()
    optimizer = build_optimizer(model.parameters(), cfg.optim, device=torch.device("cpu"))

    seen: dict = {}
    prepare = method.prepare
    method.prepare = lambda *a, **k: seen.setdefault("prepared", prepare(*a, **k))

    def grads(tag):
        seen[tag] = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}

    if isinstance(optimizer, SAM):
        first, second = optimizer.first_step, optimizer.second_step
        optimizer.first_step = lambda: (grads("grads"), first())[1]
        optimizer.second_step = lambda: (grads("grads_second"), second())[1]
    else:
        step = optimizer.step
        optimizer.step = lambda *a, **k: (grads("grads"), step(*a, **k))[1]
    batch = Batch(x=inp["x"], y=inp["y"], x_px=inp["x_px"])
    out = train_step(model, method, optimizer, batch, epoch=0, precision="fp32", device=torch.device("cpu"))
    return {"fx": fx, "out": out, "seen": seen, "model": model, "buffer": buffer.buffer.double(), "buffer_before": buffer_before,
            "idx": fx["inputs"]["injected"]["idx"]}


@pytest.fixture(scope="module", params=METHODS)
def step(request):
    return request.param, run_ours(request.param)


def test_our_buffer_starts_where_the_reference_did(step):
    name, r = step
    assert_close(r["buffer_before"], r["fx"]["inputs"]["injected"]["buffer_init"], what=f"{name} buffer before")


def test_chain_and_x_tilde(step):
    name, r = step
    ref, prepared = r["fx"]["outputs"], r["seen"]["prepared"]
    assert_close(prepared["x_sgld"], to_pixels(ref["x_sgld"]), what=f"{name} x_sgld (SGLD/PYLD chain)")
    assert_close(prepared["x_tilde"], to_pixels(ref["x_tilde"]), what=f"{name} x_tilde (sampleXadv)")


def test_buffer_after_step(step):
    name, r = step
    assert_close(r["buffer"], to_pixels(r["fx"]["outputs"]["buffer"]), what=f"{name} replay buffer", tol=BUFFER_TOLERANCE)


def test_buffer_rows_are_the_chain_in_float32(step):
    name, r = step
    idx = r["idx"]
    written = r["seen"]["prepared"]["x_sgld"].float().double()
    assert torch.equal(r["buffer"][idx], written), f"{name}: buffer rows are not the chain rounded to float32"
    untouched = torch.ones(len(r["buffer"]), dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(r["buffer"][untouched], r["buffer_before"][untouched])


def test_loss_and_gradients(step):
    name, r = step
    ref = r["fx"]["outputs"]
    assert_close(r["out"].loss.detach(), ref["loss"], what=f"{name} loss")
    for tag in ("grads", "grads_second"):
        if tag not in ref:
            continue
        assert set(r["seen"][tag]) == set(ref[tag]), f"{name} {tag}: parameters with a gradient differ"
        for key, value in ref[tag].items():
            assert_close(r["seen"][tag][key], value, what=f"{name} {tag} {key}")


def test_parameters_and_bn_statistics_after_step(step):
    name, r = step
    ref = r["fx"]["outputs"]
    params = dict(r["model"].named_parameters())
    for key, value in ref["params_after"].items():
        assert_close(params[key].detach(), value, what=f"{name} parameter after step {key}")
    state = r["model"].state_dict()
    stats = [k for k in ref["state_after"] if k.endswith(("running_mean", "running_var"))]
    assert bool(stats) == bool(r["fx"]["inputs"]["batch_norm"])
    for key in stats:
        assert_close(state[key], ref["state_after"][key], what=f"{name} BN {key} after step")


def test_x_tilde_depends_on_the_bn_order():
    """Sampling x̃ before the code's f(x_px), f(x_sgld), f(x) forwards (the old order) moves x̃: the check has teeth."""
    from robust_ebm.methods.ebjdat import code_sampler

    fx = load_fixture("ebjdat_jempp")
    inp = fx["inputs"]
    model = ebjdat_net.build(True)
    model.load_state_dict(inp["state"])
    u_gen = torch.Generator().manual_seed(0)
    x, y = inp["x"], inp["y"]
    early = code_sampler(model, x, y, eps=4 / 255, step=1 / 255, steps=5, group=1, generator=u_gen)
    model.train()
    with torch.no_grad():
        model(inp["x_px"]), model(x)
    late = code_sampler(model, x, y, eps=4 / 255, step=1 / 255, steps=5, group=1,
                        generator=torch.Generator().manual_seed(0))
    assert (early - late).abs().max() > 1e-4
