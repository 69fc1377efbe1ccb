"""PGD / FGSM: budgets, objectives, analytic optima, mode and gradient hygiene."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_ebm.attacks import AttackConfig, cw_margin, describe, fgsm, model_mode, objective_value, perturb
from robust_ebm.models import ModelConfig, build_model

OBJECTIVES = ["ce", "joint_energy", "marginal_energy", "kl", "mart", "cw_margin"]


def tiny_net(seed=0, classes=5):
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch="tiny_cnn", width=4), num_classes=classes, in_channels=1, image_size=8)


def smooth_net(seed=0, classes=4):
    """Twice-differentiable: linear -> softplus -> linear (no kinks, so small ascent steps never go down)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Softplus(), nn.Linear(16, classes))


def batch(n=6, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    x[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.0, 1.0])  # pixels on the box edges
    return x, torch.randint(0, classes, (n,), generator=g)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- objectives against their definitions

def test_objectives_match_their_definitions():
    torch.manual_seed(0)
    logits, logits_nat = torch.randn(7, 5), torch.randn(7, 5)
    y, t = torch.randint(0, 5, (7,)), torch.randint(0, 5, (7,))
    ce = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(objective_value("ce", logits, y), ce)
    torch.testing.assert_close(objective_value("ce", logits, y, target=t), -F.cross_entropy(logits, t, reduction="none"))
    torch.testing.assert_close(objective_value("joint_energy", logits, y), -logits[torch.arange(7), y])
    torch.testing.assert_close(objective_value("marginal_energy", logits, y), -torch.logsumexp(logits, 1))
    kl = F.kl_div(F.log_softmax(logits, 1), F.softmax(logits_nat, 1), reduction="none").sum(1)
    torch.testing.assert_close(objective_value("kl", logits, y, logits_nat=logits_nat), kl)
    p = logits.softmax(1)
    p_wrong = p.scatter(1, y.view(-1, 1), 0.0).max(1).values
    torch.testing.assert_close(objective_value("mart", logits, y), ce - torch.log(1.0001 - p_wrong))
    z_wrong = logits.scatter(1, y.view(-1, 1), float("-inf")).max(1).values
    torch.testing.assert_close(objective_value("cw_margin", logits, y), z_wrong - logits[torch.arange(7), y])


# ---------------------------------------------------------------- the threat model

@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("start", ["none", "uniform", "normal"])
@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.3)])
def test_budget_and_box(objective, start, norm, eps):
    model = tiny_net()
    x, y = batch()
    cfg = AttackConfig(norm=norm, eps=eps, step=eps, steps=3, random_start=start, start_std=0.05,
                       objective=objective)
    x_adv = perturb(model, x, y, cfg, generator=gen())
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad
    assert delta.abs().max() > 0  # it moved


def test_no_projection_keeps_only_the_box():
    model = tiny_net()
    x, y = batch()
    cfg = AttackConfig(eps=2 / 255, step=2 / 255, steps=5, random_start="uniform", project=False)
    x_adv = perturb(model, x, y, cfg, generator=gen())
    assert (x_adv - x).abs().max() > 2 / 255 + 1e-4
    assert x_adv.min() >= 0 and x_adv.max() <= 1


# ---------------------------------------------------------------- ascent

@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_each_step_does_not_decrease_the_objective(objective, norm):
    model = smooth_net().eval()
    x, _ = batch(classes=4)
    x = 0.3 + 0.4 * x  # away from the box, with a large ball: only the gradient step acts
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    logits_nat = model(x).detach()
    values = []
    for steps in range(1, 6):
        cfg = AttackConfig(norm=norm, eps=1.0, step=1e-3, steps=steps, random_start="normal",
                           start_std=0.01, objective=objective)
        x_adv = perturb(model, x, y, cfg, logits_nat=logits_nat, generator=gen())
        values.append(objective_value(objective, model(x_adv), y, logits_nat))
    values = torch.stack(values)
    assert (values[1:] - values[:-1] >= -1e-6).all()
    assert (values[-1] > values[0]).all()


def binary_linear(seed=0, dim=64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(dim, 2)).eval()


@pytest.mark.parametrize("start", ["none", "uniform"])
def test_linf_pgd_reaches_the_analytic_optimum_of_a_linear_model(start):
    """f(x) = Wx + b, two classes: CE ascends along w_wrong - w_y, so x* = clip(x + ε sign(w_wrong - w_y), 0, 1)."""
    model = binary_linear()
    x, _ = batch()
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    eps = 8 / 255
    w = model[1].weight.detach()
    d = (w[1 - y] - w[y]).view_as(x)
    expected = (x + eps * d.sign()).clamp(0, 1)
    cfg = AttackConfig(eps=eps, step=eps / 4, steps=12, random_start=start)
    torch.testing.assert_close(perturb(model, x, y, cfg, generator=gen()), expected, atol=1e-6, rtol=0)
    # the joint energy E(x,y) = -w_y.x - b_y is ascended along -w_y instead
    cfg_e = AttackConfig(eps=eps, step=eps / 4, steps=12, random_start=start, objective="joint_energy")
    expected_e = (x - eps * w[y].view_as(x).sign()).clamp(0, 1)
    torch.testing.assert_close(perturb(model, x, y, cfg_e, generator=gen()), expected_e, atol=1e-6, rtol=0)
    # FGSM is the one-step version and already optimal here
    torch.testing.assert_close(fgsm(model, x, y, eps), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- CW-L∞: PGD on the Carlini-Wagner margin

def test_cw_margin_value_and_gradient_match_the_formula_on_a_tiny_model():
    """m(x,y) = max_{j≠y} f_j(x) - f_y(x); ∇_x m = ∇f_ĵ - ∇f_y with ĵ the best wrong class."""
    model = tiny_net(classes=5).eval()
    x, y = batch()
    x = x.clone().requires_grad_(True)
    logits = model(x)
    value = cw_margin(logits, y)
    (grad,) = torch.autograd.grad(value.sum(), x, retain_graph=True)
    with torch.no_grad():
        masked = logits.scatter(1, y.view(-1, 1), float("-inf"))
    best_wrong = masked.argmax(1)
    torch.testing.assert_close(value, masked.max(1).values - logits[torch.arange(len(y)), y])
    assert ((value > 0) == (logits.argmax(1) != y)).all()  # positive exactly when misclassified
    for i in range(len(y)):  # per-sample formula, one logit at a time (eval mode: samples are independent)
        (g_wrong,) = torch.autograd.grad(logits[i, best_wrong[i]], x, retain_graph=True)
        (g_true,) = torch.autograd.grad(logits[i, y[i]], x, retain_graph=True)
        torch.testing.assert_close(grad[i], (g_wrong - g_true)[i])


def test_cw_pgd_on_two_classes_reaches_the_analytic_optimum():
    """With two classes the CW margin is (w_wrong - w_y)·x + const: same optimum as CE."""
    model = binary_linear()
    x, _ = batch()
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    w = model[1].weight.detach()
    expected = (x + 8 / 255 * (w[1 - y] - w[y]).view_as(x).sign()).clamp(0, 1)
    cfg = AttackConfig(eps=8 / 255, step=2 / 255, steps=8, random_start="uniform", objective="cw_margin")
    torch.testing.assert_close(perturb(model, x, y, cfg, generator=gen()), expected, atol=1e-6, rtol=0)
    assert "PGD-8 on cw_margin" in describe(cfg)


@pytest.mark.parametrize("classes", [10, 5])
def test_cw_attack_never_increases_accuracy(classes):
    """Linear f: a signed step along ∇f_ĵ - ∇f_y (clipped per pixel) never lowers the margin, so a
    misclassified point stays misclassified and no point gets better; the tiny CNN must agree."""
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, classes)).eval()
    x, _ = batch(n=32, classes=classes)
    shift = torch.randint(1, classes, (16,), generator=gen(5))
    cfg = AttackConfig(eps=0.1, step=0.025, steps=10, random_start="none", objective="cw_margin")
    for model in (linear, tiny_net(classes=classes).eval()):
        with torch.no_grad():
            clean = model(x)
        y = clean.argmax(1)
        y[16:] = (y[16:] + shift) % classes  # half the points misclassified
        x_adv = perturb(model, x, y, cfg)
        with torch.no_grad():
            adv = model(x_adv)
        correct_clean, correct_adv = clean.argmax(1) == y, adv.argmax(1) == y
        assert not (correct_adv & ~correct_clean).any()
        assert correct_adv.float().mean() <= correct_clean.float().mean()
        if model is linear:
            assert (cw_margin(adv, y) >= cw_margin(clean, y) - 1e-6).all()
            assert 0 < correct_clean.float().mean() and correct_adv.float().mean() < correct_clean.float().mean()


def test_l2_pgd_on_a_linear_model_moves_along_the_weight_difference():
    """Far from the box, the L2 optimum is x + ε (w_wrong - w_y) / ||w_wrong - w_y||."""
    model = binary_linear()
    x = torch.full((2, 1, 8, 8), 0.5)
    y = torch.tensor([0, 1])
    w = model[1].weight.detach()
    d = (w[1 - y] - w[y]).view_as(x)
    expected = x + 0.2 * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    cfg = AttackConfig(norm="l2", eps=0.2, step=0.05, steps=8, random_start="none")
    torch.testing.assert_close(perturb(model, x, y, cfg), expected, atol=1e-5, rtol=0)


def test_targeted_attack_lowers_ce_to_the_target():
    model = tiny_net().eval()
    x, y = batch()
    target = (y + 1) % 5
    cfg = AttackConfig(eps=16 / 255, step=4 / 255, steps=10, targeted=True)
    x_adv = perturb(model, x, y, cfg, target=target, generator=gen())
    with torch.no_grad():
        before = F.cross_entropy(model(x), target, reduction="none")
        after = F.cross_entropy(model(x_adv), target, reduction="none")
    assert (after < before).all()


@pytest.mark.parametrize("objective", ["ce", "joint_energy"])
def test_restarts_are_never_worse_than_one_restart(objective):
    model = tiny_net().eval()
    x, y = batch(n=12)
    one = AttackConfig(eps=4 / 255, step=1 / 255, steps=3, objective=objective)
    many = one.model_copy(update={"restarts": 4})
    # same generator seed: the first of the four restarts is the single-restart run
    x1, x4 = perturb(model, x, y, one, generator=gen(3)), perturb(model, x, y, many, generator=gen(3))
    with torch.no_grad():
        l1, l4 = model(x1), model(x4)
    v1, v4 = objective_value(objective, l1, y), objective_value(objective, l4, y)
    if objective == "ce":
        s1, s4 = l1.argmax(1) != y, l4.argmax(1) != y
        assert (s4 >= s1).all()
        assert (v4[s4 == s1] >= v1[s4 == s1] - 1e-6).all()
    else:
        assert (v4 >= v1 - 1e-6).all()


def test_kl_with_logits_nat_inside_or_passed_is_the_same():
    model = tiny_net().eval()
    x, y = batch()
    cfg = AttackConfig(objective="kl", random_start="normal", eps=8 / 255, step=2 / 255, steps=4)
    inside = perturb(model, x, y, cfg, generator=gen())
    with torch.no_grad():
        passed = perturb(model, x, y, cfg, logits_nat=model(x), generator=gen())
    assert torch.equal(inside, passed)


def test_kl_natural_logits_are_computed_once():
    model = tiny_net().eval()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    x, y = batch()
    perturb(model, x, y, AttackConfig(objective="kl", random_start="normal", steps=5), generator=gen())
    assert len(calls) == 5 + 1


# ---------------------------------------------------------------- hygiene

class Recorder(nn.Module):
    """A tiny net with BN and dropout that records its mode at every call and can be told to fail."""

    def __init__(self, fail_at=None):
        super().__init__()
        self.net = tiny_net()
        self.drop = nn.Dropout(0.5)
        self.modes, self.fail_at = [], fail_at

    def forward(self, x):
        self.modes.append(self.training)
        if self.fail_at is not None and len(self.modes) == self.fail_at:
            raise RuntimeError("boom")
        return self.drop(self.net(x))


@pytest.mark.parametrize("before", [True, False])
@pytest.mark.parametrize("attack_mode", ["eval", "train"])
def test_model_mode_is_set_during_and_restored_after(before, attack_mode):
    model = Recorder().train(before)
    x, y = batch()
    perturb(model, x, y, AttackConfig(steps=2, model_mode=attack_mode), generator=gen())
    assert model.modes == [attack_mode == "train"] * 2
    assert all(m.training == before for m in model.modules())


def test_mode_restored_on_exception_including_mixed_submodule_modes():
    model = Recorder(fail_at=2).train()
    model.net.eval()  # e.g. a frozen BN backbone inside a model in train mode
    x, y = batch()
    with pytest.raises(RuntimeError, match="boom"):
        perturb(model, x, y, AttackConfig(steps=3), generator=gen())
    assert model.training and model.drop.training and not model.net.training and not model.net.trunk.norm1.training


def test_model_mode_context_restores_each_submodule():
    model = tiny_net().train()
    model.trunk.norm1.eval()
    with model_mode(model, "eval"):
        assert not any(m.training for m in model.modules())
    assert model.training and not model.trunk.norm1.training


def test_no_parameter_gradients_and_requires_grad_untouched():
    model = tiny_net()
    model.fc.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = batch()
    for objective in OBJECTIVES:
        perturb(model, x, y, AttackConfig(objective=objective, steps=2, restarts=2), generator=gen())
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_works_under_no_grad_context():
    model = tiny_net().eval()
    x, y = batch()
    with torch.no_grad():
        x_adv = perturb(model, x, y, AttackConfig(steps=2), generator=gen())
    assert (x_adv - x).abs().max() > 0


# ---------------------------------------------------------------- bad input

def test_bad_inputs_fail_with_clear_errors():
    model = tiny_net()
    x, y = batch()
    with pytest.raises(ValueError, match="\\[0,1\\]"):
        perturb(model, 2 * x - 1, y, AttackConfig())
    with pytest.raises(ValueError, match="target="):
        perturb(model, x, y, AttackConfig(targeted=True))
    with pytest.raises(ValueError, match="targeted: true"):
        perturb(model, x, y, AttackConfig(), target=y)
    with pytest.raises(ValueError, match="shape"):
        perturb(model, x, y[:2], AttackConfig())
    with pytest.raises(ValueError, match="targeted"):
        AttackConfig(objective="kl", targeted=True)
    with pytest.raises(ValueError, match="pixel units"):
        AttackConfig(eps=8)
    assert AttackConfig(eps="8/255").eps == pytest.approx(8 / 255)
