"""Golden fixtures of JEAT's two non-adversarial baselines: standard training and noise injection.

Neither has public code (JEAT's repository does not exist), so the golden is the definition, written out
here independently of src/robust_ebm (plain autograd, float64, the tiny net of ebjdat_net.py):

    standard:          L = mean[E(x, y) - E(x)] = mean[-log p(y|x)]                     JEAT Eq. 5-7
    noise_sigma:       L = mean[E(x~, y) - E(x~)],  x~ = x + sigma n,  n ~ N(0, I)      JEAT §4 (noise injection)

Noise is added in [0,1] pixel units to the (augmented) batch and not clipped [R]; sigma is the std
(8/255, 16/255, 24/255 [R: std reading of the paper's sigma]). The noise n is the loader's own draw
(data.TensorLoader: torch.randn of the batch shape from its generator, float32), stored in the fixture.
"""

from __future__ import annotations

from pathlib import Path

import torch

from golden import ebjdat_net
from golden.common import save_fixture

REPOSITORIES = ()
N, SEED = 8, 31
SIGMAS = {"standard": 0.0, "noise_8": 8 / 255, "noise_16": 16 / 255, "noise_24": 24 / 255}
SOURCE = {"repo": "paper: Zhu et al., ICCV 2021 (arXiv 2108.09093), standard and noise-injection baselines; "
                  "no public code", "commit": None, "file": "Eq. 5-7; §4 noise injection",
          "function": "written out in tests/golden/gen_baselines.py"}


def cross_entropy(logits, y):
    """E(x, y) - E(x) with E(x, y) = -f(x)[y], E(x) = -logsumexp f(x) (Eq. 5-7)."""
    return (-logits[torch.arange(len(y)), y] + torch.logsumexp(logits, 1)).mean()


def generate(refs) -> list[Path]:
    state = ebjdat_net.initial_state(False, seed=7)
    images = ebjdat_net.images(N, seed=23)
    x = (images * 255).round() / 255                          # uint8-representable: the loader reads uint8
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(SEED))   # the loader's draw
    outputs = {}
    for name, sigma in SIGMAS.items():
        f = ebjdat_net.build(False)
        f.load_state_dict(state)
        f.train()
        x_in = x + sigma * noise.double() if sigma > 0 else x
        loss = cross_entropy(f(x_in), y)
        names, params = zip(*f.named_parameters())
        outputs[name] = {"x_in": x_in.detach(), "loss": loss.detach(),
                         "grads": dict(zip(names, torch.autograd.grad(loss, params)))}
    inputs = {"state": state, "x": x, "y": y, "loader_seed": SEED, "noise": noise, "sigmas": SIGMAS}
    note = ("Source: the definitions (no public code): CE in energy form, and CE at x + sigma n with the "
            "loader's N(0, I) draw, unclipped [R].")
    return [save_fixture("baselines", source=SOURCE, inputs=inputs, outputs=outputs, note=note)]
