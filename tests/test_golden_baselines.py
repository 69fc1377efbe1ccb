"""standard and noise_8/16/24 equal their definitions (fixtures of tests/golden/gen_baselines.py).

Our side: the training loader (data.TensorLoader, no augmentation, the method's noise_std and a generator
seeded as the fixture says) produces the batch, then the method's own prepare -> loss from params.yaml.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from golden import ebjdat_net
from golden.common import assert_close, load_fixture
from robust_ebm.config import load_params
from robust_ebm.data import TensorSplit, make_loader
from robust_ebm.methods import Batch, build_method

REPO = Path(__file__).resolve().parents[1]
FIXTURE = load_fixture("baselines")
METHODS = load_params(REPO / "params.yaml").methods


@pytest.mark.parametrize("name", list(FIXTURE["inputs"]["sigmas"]))
def test_loss_and_gradients_equal_the_definition(name):
    inp, ref = FIXTURE["inputs"], FIXTURE["outputs"][name]
    cfg = METHODS[name]
    assert cfg.loss == "standard" and cfg.data.noise_std == pytest.approx(inp["sigmas"][name])
    split = TensorSplit((inp["x"] * 255).round().to(torch.uint8), inp["y"])
    loader = make_loader(split, len(split), augment="none", noise_std=cfg.data.noise_std, shuffle=False,
                         generator=torch.Generator().manual_seed(int(inp["loader_seed"])))
    (x, y), = list(loader)
    assert_close(x.double() if cfg.data.noise_std == 0 else inp["x"] + (x - inp["x"].float()).double(),
                 ref["x_in"], what=f"{name} batch", tol=1e-6)  # the loader works in float32 (1 ulp of [0,1])
    model = ebjdat_net.build(False).double()
    model.load_state_dict(inp["state"])
    model.train()
    x64 = inp["x"] + cfg.data.noise_std * inp["noise"].double() if cfg.data.noise_std > 0 else inp["x"]
    method = build_method(cfg, num_classes=ebjdat_net.NUM_CLASSES, image_shape=tuple(x64.shape[1:]), stats=None,
                          device="cpu", generator=torch.Generator().manual_seed(0))
    out = method.loss(model, method.prepare(model, Batch(x=x64, y=y), epoch=0), epoch=0)
    assert_close(out.loss.detach(), ref["loss"], what=f"{name} loss")
    names, params = zip(*model.named_parameters())
    for key, grad in zip(names, torch.autograd.grad(out.loss, params)):
        assert_close(grad, ref["grads"][key], what=f"{name} grad {key}")
