"""Golden fixtures of JEAT and PreJEAT (Zhu et al., ICCV 2021): no public code, so the golden is the paper.

Source "paper": Algorithm 1 and Eq. 5-7, 17, 18 of arXiv 2108.09093 (papers.md §2.7-2.8), written out
here independently of src/robust_ebm (plain autograd on the tiny net of ebjdat_net.py, float64):

    E(x, y) = -f(x)[y],  E(x) = -log sum_k exp f(x)[k]                              Eq. 5-7
    1. delta0 ~ U(-eps, eps);  delta = clip(delta0 + eps * sign(grad_x E(x + delta0, y)), -eps, eps);
       x_adv = x + delta                                                            Alg. 1 line 3-5 (Eq. 18)
    2. x~_0 from the replay buffer B (U(0,1) with probability rho);
       x~_{t+1} = x~_t - (alpha/2) grad_x E(x~_t) + sqrt(alpha) N(0, I);  x~_K back into B   Alg. 1 line 6-10
    3. JEAT:    L = mean[E(x_adv, y) - E(x_adv)] + (mean E(x_adv) - mean E(x~_K))       Alg. 1 line 11
       PreJEAT: L = mean[E(x_adv, y) - E(x_adv)]  (CE at the energy adversarial example, §3.3)

What the paper leaves open is labelled [R] (our choice, the same in our code): the gradient of step 1
is taken at x + delta0; the image range [0,1] is enforced after the random start and after the step
(every attack here returns valid images; the outputs also hold the literal, unclipped Alg. 1 x_adv);
alpha, K, rho, |B| are free (the fixture uses alpha 0.01, K 20, rho 0.05, |B| 20); no normalisation layers.

Randomness: the noise n_t are float32 tensors (our sampler draws them in torch's default dtype), so the
noise term sqrt(alpha) n_t is formed in float32 and then added to the float64 chain, as ours does.
Our draws, in our order (methods/jeat.py, attacks._random_start, sampling.ReplayBuffer,
sampling.langevin), from a method generator seeded `seed`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from golden import ebjdat_net
from golden.common import save_fixture

REPOSITORIES = ()
EPS = 8 / 255
ALPHA, STEPS, RHO, BUFFER_SIZE = 0.01, 20, 0.05, 20
N = 8
SHAPE = (3, ebjdat_net.IMAGE_SIZE, ebjdat_net.IMAGE_SIZE)
SOURCE = {"repo": "paper: Zhu et al., Towards Understanding the Generative Capability of Adversarially Robust "
                  "Classifiers, ICCV 2021 (arXiv 2108.09093); no public code", "commit": None,
          "file": "Algorithm 1; Eq. 5-7, 17, 18", "function": "written out in tests/golden/gen_jeat.py"}


def joint_energy(logits, y):            # Eq. 6: E(x, y) = -f(x)[y]
    return -logits[torch.arange(len(y)), y]


def marginal_energy(logits):            # Eq. 7: E(x) = -LogSumExp_y f(x)[y]
    return -torch.logsumexp(logits, 1)


def energy_adversarial(f, x, y, u, *, clip_range: bool):
    """Algorithm 1 step 1 (one signed step of size eps on E(x + delta0, y) from a uniform start)."""
    delta0 = EPS * (2 * u - 1)
    start = (x + delta0).clamp(0, 1) if clip_range else x + delta0
    start = start.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(joint_energy(f(start), y).sum(), start)
    delta = (start.detach() - x + EPS * grad.sign()).clamp(-EPS, EPS)
    return (x + delta).clamp(0, 1) if clip_range else x + delta


def draws(seed: int, *, sampler: bool) -> dict:
    """Our draws in our order: buffer seed, buffer fill, attack start, buffer rows/coin/fresh rows, SGLD noise."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    if sampler:
        own = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=g)))
        out["buffer_init"] = torch.rand((BUFFER_SIZE, *SHAPE), generator=own)
    out["u"] = torch.rand((N, *SHAPE), generator=g, dtype=torch.float64)
    if sampler:
        out["idx"] = torch.randint(BUFFER_SIZE, (N,), generator=own)
        out["coin"] = torch.rand((N,), generator=own)
        k = int((out["coin"] < RHO).sum())
        out["fresh"] = torch.rand((k, *SHAPE), generator=own) if k else torch.zeros((0, *SHAPE))
        out["noise"] = torch.stack([torch.randn((N, *SHAPE), generator=g) for _ in range(STEPS)])
    return out


def pick_seed(start: int) -> int:
    """Distinct buffer rows (write-back of duplicates is unspecified) and at least one fresh row."""
    for seed in range(start, start + 10_000):
        d = draws(seed, sampler=True)
        if len(set(d["idx"].tolist())) == N and bool((d["coin"] < RHO).any()):
            return seed
    raise RuntimeError("no seed found")


def sgld_chain(f, d) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 step 2: returns x~_K and the buffer after the write-back (float32 storage, as ours)."""
    buffer = d["buffer_init"].clone()
    x = buffer[d["idx"]].double()
    x[d["coin"] < RHO] = d["fresh"].double()
    for t in range(STEPS):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(marginal_energy(f(x)).sum(), x)
        x = x.detach() - (ALPHA / 2) * grad + (math.sqrt(ALPHA) * d["noise"][t]).double()  # float32 noise term
    buffer[d["idx"]] = x.float()
    return x, buffer


def grads_of(f, loss) -> dict:
    names, params = zip(*f.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params)))


def generate_one(name: str, seed_start: int) -> Path:
    sampler = name == "jeat"
    seed = pick_seed(seed_start) if sampler else seed_start
    d = draws(seed, sampler=sampler)
    state = ebjdat_net.initial_state(False, seed=5)
    f = ebjdat_net.build(False)
    f.load_state_dict(state)
    f.train()
    x, y = ebjdat_net.images(N, seed=21), torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])
    x_adv = energy_adversarial(f, x, y, d["u"], clip_range=True)
    literal = energy_adversarial(f, x, y, d["u"], clip_range=False)
    logits_adv = f(x_adv)
    ce = (joint_energy(logits_adv, y) - marginal_energy(logits_adv)).mean()   # E(x,y) - E(x) = -log p(y|x)
    outputs = {"x_adv": x_adv, "x_adv_literal": literal}
    if sampler:
        x_sgld, buffer = sgld_chain(f, d)
        loss = ce + (marginal_energy(logits_adv).mean() - marginal_energy(f(x_sgld)).mean())
        outputs |= {"x_sgld": x_sgld, "buffer": buffer}
    else:
        loss = ce
    outputs |= {"loss": loss.detach(), "grads": grads_of(f, loss)}
    inputs = {"state": state, "x": x, "y": y, "seed": seed, "eps": EPS,
              **({"alpha": ALPHA, "steps": STEPS, "rho": RHO, "buffer_size": BUFFER_SIZE} if sampler else {}),
              "injected": {k: v for k, v in d.items()}}
    note = ("Source: the JEAT paper (no public code exists): Algorithm 1 and Eq. 5-7, 17, 18, written out in "
            "tests/golden/gen_jeat.py. [R] (not in the paper, our choice): gradient at x + delta0, clip to [0,1] "
            "after start and step (x_adv_literal: without), alpha/K/rho/|B| values, no normalisation.")
    return save_fixture(name, source=SOURCE, inputs=inputs, outputs=outputs, note=note)


def generate(refs) -> list[Path]:
    return [generate_one("jeat", 400), generate_one("prejeat", 500)]
