"""Fisher scores (JEAT Eq. 23-24): Hutchinson and exact traces against torch's Hessian, closed forms."""

import pytest
import torch
from torch import nn

from robust_ebm.energy import joint_energy, marginal_energy
from robust_ebm.metrics.fisher import exact_trace, fisher_scores, hutchinson_trace, score_matching_terms

SHAPE = (2, 2, 2)  # input dim 8


class SmoothNet(nn.Module):
    """A tiny classifier with smooth activations, so the input Hessian is not zero."""

    def __init__(self, classes=3, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(dim, 16), nn.Softplus(), nn.Linear(16, 16), nn.Tanh(),
                                 nn.Linear(16, classes)).double()

    def forward(self, x):
        return self.net(x)


class Quadratic(nn.Module):
    """logits_k = -(½ xᵀ A_k x + b_kᵀ x), so E(x,y) = ½ xᵀ A_y x + b_yᵀ x (closed-form score)."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = nn.Parameter(a), nn.Parameter(b)

    def forward(self, x):
        flat = x.flatten(1)
        return -(0.5 * torch.einsum("bi,kij,bj->bk", flat, self.a, flat) + flat @ self.b.T)


def per_sample_hessian_trace(energy_fn, x):
    return torch.stack([torch.autograd.functional.hessian(energy_fn(i), x[i]).reshape(x[i].numel(), -1).trace()
                        for i in range(len(x))])


def joint_fn(model, y):
    return lambda i: (lambda xi: joint_energy(model(xi[None]), y[i:i + 1]).sum())


def graph(model, x, y):
    x = x.clone().requires_grad_(True)
    energy = joint_energy(model(x), y)
    (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=True)
    return x, grad


def test_exact_trace_matches_autograd_hessian():
    model, x, y = SmoothNet(), torch.rand(5, *SHAPE, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    xg, grad = graph(model, x, y)
    expected = per_sample_hessian_trace(joint_fn(model, y), x)
    assert expected.abs().min() > 1e-6  # the test is not vacuous
    torch.testing.assert_close(exact_trace(grad, xg), expected, rtol=1e-8, atol=1e-10)


def test_hutchinson_converges_to_the_trace_within_its_standard_error():
    model, x, y = SmoothNet(), torch.rand(3, *SHAPE, dtype=torch.float64), torch.tensor([2, 0, 1])
    probes = 3000
    xg, grad = graph(model, x, y)
    estimate = hutchinson_trace(grad, xg, probes, torch.Generator().manual_seed(1))
    hessians = [torch.autograd.functional.hessian(joint_fn(model, y)(i), x[i]).reshape(8, 8) for i in range(3)]
    exact = torch.stack([h.trace() for h in hessians])
    # Var(vᵀHv) = 2 Σ_{i≠j} H_ij² for Rademacher v
    stderr = torch.stack([(2 * (h.pow(2).sum() - h.diagonal().pow(2).sum()) / probes).sqrt() for h in hessians])
    assert ((estimate - exact).abs() <= 5 * stderr + 1e-9).all(), (estimate, exact, stderr)


def test_scores_with_exact_trace_match_a_direct_computation():
    model, x, y = SmoothNet(), torch.rand(4, *SHAPE, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    res = fisher_scores(model, x, y, probes=None, batch_size=3)
    direct = {}
    for name, energy_of in (("jfs", lambda xi, yi: joint_energy(model(xi[None]), yi[None]).sum()),
                            ("mfs", lambda xi, yi: marginal_energy(model(xi[None])).sum())):
        terms = []
        for xi, yi in zip(x, y):
            g = torch.autograd.functional.jacobian(lambda z: energy_of(z, yi), xi)
            h = torch.autograd.functional.hessian(lambda z: energy_of(z, yi), xi).reshape(8, 8)
            terms.append(0.5 * g.pow(2).sum() - h.trace())
        direct[name] = torch.stack(terms).mean().item()
    assert res["jfs"] == pytest.approx(direct["jfs"], rel=1e-8)
    assert res["mfs"] == pytest.approx(direct["mfs"], rel=1e-8)
    assert res["probes"] == "exact" and res["n"] == 4 and res["pixel_scale"] == "[0,1]"


def test_quadratic_energy_has_the_closed_form_score():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(2, 8, 8, generator=g, dtype=torch.float64)
    a = m @ m.transpose(1, 2) + torch.eye(8, dtype=torch.float64)          # symmetric, per class
    b = torch.randn(2, 8, generator=g, dtype=torch.float64)
    model, x, y = Quadratic(a, b), torch.rand(6, *SHAPE, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    flat = x.flatten(1)
    grad = torch.einsum("bij,bj->bi", a[y], flat) + b[y]                   # ∇E = A_y x + b_y
    closed = (0.5 * grad.pow(2).sum(1) - a[y].diagonal(dim1=1, dim2=2).sum(1)).mean().item()
    assert fisher_scores(model, x, y, probes=None)["jfs"] == pytest.approx(closed, rel=1e-10)


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_marginal_equals_joint_for_one_class():
    """vᵀ D v = tr D for Rademacher v when D is diagonal; with K=1, E(x) = E(x,y)."""
    a = torch.diag_embed(torch.rand(1, 8, dtype=torch.float64) + 0.5)
    model, x, y = Quadratic(a, torch.zeros(1, 8, dtype=torch.float64)), torch.rand(5, *SHAPE, dtype=torch.float64), torch.zeros(5, dtype=torch.long)
    one_probe = fisher_scores(model, x, y, probes=1, generator=torch.Generator().manual_seed(3))
    exact = fisher_scores(model, x, y, probes=None)
    assert one_probe["jfs"] == pytest.approx(exact["jfs"], rel=1e-12)
    assert exact["mfs"] == pytest.approx(exact["jfs"], rel=1e-12)


def test_model_mode_and_parameter_flags_are_restored():
    model = SmoothNet().train()
    model.net[0].requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    fisher_scores(model, torch.rand(2, *SHAPE, dtype=torch.float64), torch.tensor([0, 1]), probes=2)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags


def test_uint8_images_are_scored_in_unit_pixel_scale():
    model = SmoothNet().float()
    u8 = torch.randint(0, 256, (3, *SHAPE), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2])
    assert fisher_scores(model, u8, y, probes=None)["jfs"] == pytest.approx(
        fisher_scores(model, u8.float() / 255, y, probes=None)["jfs"], rel=1e-5)


def test_bad_arguments_fail_early():
    model = SmoothNet()
    with pytest.raises(ValueError, match="probes"):
        fisher_scores(model, torch.rand(2, *SHAPE, dtype=torch.float64), torch.tensor([0, 1]), probes=0)
    with pytest.raises(ValueError, match="matching"):
        fisher_scores(model, torch.rand(2, *SHAPE, dtype=torch.float64), torch.tensor([0]), probes=1)


def test_score_matching_terms_shapes():
    model, x, y = SmoothNet(), torch.rand(3, *SHAPE, dtype=torch.float64).requires_grad_(True), torch.tensor([0, 1, 2])
    half, trace = score_matching_terms(joint_energy(model(x), y), x, probes=4)
    assert half.shape == trace.shape == (3,) and (half >= 0).all()


def test_score_std_is_the_spread_of_the_per_image_scores():
    """jfs_std / mfs_std (the claims stage's standard errors) = std over images of each image's own score."""
    model = SmoothNet()
    x = torch.rand(6, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    whole = fisher_scores(model, x, y, probes=None, batch_size=4)
    single = [fisher_scores(model, x[i:i + 1], y[i:i + 1], probes=None) for i in range(6)]
    for name in ("jfs", "mfs"):
        per_image = torch.tensor([s[name] for s in single], dtype=torch.float64)
        assert whole[f"{name}_std"] == pytest.approx(per_image.std().item(), rel=1e-6)
    assert single[0]["jfs_std"] == 0.0  # one image: no spread
