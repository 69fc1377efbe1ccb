"""The two energies every method, attack, sampler and plot is built on.

A classifier f maps an image to K logits f(x)[k]. Reading the logits as an
energy-based model (JEM; JEAT Eq. 5-7; WEAT §3):

    E(x, y) = -f(x)[y]                      joint energy,    p(x, y) ∝ exp(-E(x, y))
    E(x)    = -logsumexp_k f(x)[k]          marginal energy, p(x)    ∝ exp(-E(x))
    p(y|x)  = exp(-E(x, y)) / exp(-E(x))    so  CE(x, y) = E(x, y) - E(x)

Low energy = high density. All functions are per-sample (shape ``(B,)``) so
callers choose their own reduction.
"""

from __future__ import annotations

import torch
from torch import Tensor


def joint_energy(logits: Tensor, y: Tensor) -> Tensor:
    """E(x, y) = -f(x)[y]."""
    return -logits.gather(1, y.view(-1, 1)).squeeze(1)


def marginal_energy(logits: Tensor) -> Tensor:
    """E(x) = -logsumexp_k f(x)[k]."""
    return -torch.logsumexp(logits, dim=1)


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy written with energies: CE(x, y) = E(x, y) - E(x)."""
    return joint_energy(logits, y) - marginal_energy(logits)


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Per-sample KL(p(.|x) || q(.|x*)) between the softmaxes of two logit batches.

    In energy form (WEAT Prop. 1):
    KL = E_{k~p}[E(x*, k) - E(x, k)] + (E(x) - E(x*)), a conditional and a
    marginal energy-alignment term.
    """
    log_p = torch.log_softmax(logits_p, dim=1)
    log_q = torch.log_softmax(logits_q, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)
