"""The energy identities every other module relies on (spec §1)."""

import torch
import torch.nn.functional as F

from robust_ebm.energy import cross_entropy, joint_energy, kl_divergence, marginal_energy


def _logits(seed=0, b=16, k=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g, dtype=torch.float64) * 3, torch.randint(0, k, (b,), generator=g)


def test_joint_energy_is_negative_logit():
    logits, y = _logits()
    assert torch.equal(joint_energy(logits, y), -logits[torch.arange(len(y)), y])


def test_marginal_energy_is_negative_logsumexp():
    logits, _ = _logits()
    expected = -torch.log(torch.exp(logits).sum(dim=1))
    torch.testing.assert_close(marginal_energy(logits), expected)


def test_cross_entropy_equals_energy_difference():
    logits, y = _logits()
    torch.testing.assert_close(cross_entropy(logits, y), F.cross_entropy(logits, y, reduction="none"))


def test_softmax_is_boltzmann_ratio():
    """p(y|x) = exp(-E(x,y)) / exp(-E(x))."""
    logits, y = _logits()
    p = torch.exp(-joint_energy(logits, y)) / torch.exp(-marginal_energy(logits))
    torch.testing.assert_close(p, torch.softmax(logits, 1)[torch.arange(len(y)), y])


def test_kl_matches_torch_and_energy_form_of_weat_proposition_1():
    """KL(p(.|x)||p(.|x*)) = E_{k~p(.|x)}[E(x*,k) - E(x,k)] + (E(x) - E(x*))."""
    nat, _ = _logits(1)
    adv, _ = _logits(2)
    kl = kl_divergence(nat, adv)
    reference = F.kl_div(torch.log_softmax(adv, 1), torch.log_softmax(nat, 1), log_target=True, reduction="none").sum(1)
    torch.testing.assert_close(kl, reference)
    p = torch.softmax(nat, 1)
    conditional = (p * ((-adv) - (-nat))).sum(1)  # E(x*,k) = -adv[k], E(x,k) = -nat[k]
    marginal = marginal_energy(nat) - marginal_energy(adv)
    torch.testing.assert_close(kl, conditional + marginal)
    assert (kl >= -1e-12).all()
    torch.testing.assert_close(kl_divergence(nat, nat), torch.zeros(len(nat), dtype=nat.dtype))


def test_energies_are_differentiable_per_sample():
    logits, y = _logits()
    logits.requires_grad_(True)
    marginal_energy(logits).sum().backward()
    torch.testing.assert_close(logits.grad, -torch.softmax(logits.detach(), 1))
