import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from robust_ebm.optim import SAM, LRSchedule, build_optimizer, frozen_bn_stats


def optim_cfg(**kw):
    base = dict(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, nesterov=False, betas=(0.9, 0.999),
                sam_rho=0.05, sam_adaptive=False)
    return SimpleNamespace(**{**base, **kw})


def sched_cfg(**kw):
    base = dict(name="constant", epochs=4, milestones=[], gamma=0.1, warmup_iters=0, pct_start=0.25)
    return SimpleNamespace(**{**base, **kw})


def toy():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    return model, lambda: ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_perturbation_matches_formula_and_restores(adaptive):
    model, loss_fn = toy()
    opt = build_optimizer(model.parameters(), optim_cfg(name="sam", sam_rho=0.3, sam_adaptive=adaptive),
                          device=torch.device("cpu"))
    assert isinstance(opt, SAM)
    w0 = [p.detach().clone() for p in model.parameters()]
    loss_fn().backward()
    g = [p.grad.clone() for p in model.parameters()]
    t = [w.abs() if adaptive else torch.ones_like(w) for w in w0]
    norm = math.sqrt(sum(((ti * gi) ** 2).sum().item() for ti, gi in zip(t, g)))
    expected = [0.3 * ti**2 * gi / norm for ti, gi in zip(t, g)]

    opt.first_step()
    for p, w, e in zip(model.parameters(), w0, expected):
        torch.testing.assert_close(p.detach() - w, e)
    # ||T^-1 e|| = rho: the perturbation sits on the sphere of radius rho (in the scaled metric)
    scaled_norm = math.sqrt(sum(((e / ti) ** 2).sum().item() for e, ti in zip(expected, t)))
    assert scaled_norm == pytest.approx(0.3, rel=1e-5)

    opt.zero_grad()
    loss_fn().backward()
    g_adv = [p.grad.clone() for p in model.parameters()]
    opt.second_step()
    for p, w, ga in zip(model.parameters(), w0, g_adv):   # restored exactly, then plain SGD with g(w + e)
        torch.testing.assert_close(p.detach(), w - 0.1 * ga, rtol=0, atol=1e-7)


def test_sam_second_step_needs_first():
    model, _ = toy()
    opt = build_optimizer(model.parameters(), optim_cfg(name="sam"), device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()


def test_frozen_bn_stats_keeps_running_stats():
    bn = nn.BatchNorm1d(3)
    bn.train()
    with frozen_bn_stats(bn):
        bn(torch.randn(16, 3) + 5)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and bn.momentum == 0.1
    bn(torch.randn(16, 3) + 5)
    assert bn.running_mean.mean() > 0.1


def lrs(cfg, steps_per_epoch, n, lr=0.1, opt_name="sgd"):
    model = nn.Linear(2, 1)
    opt = build_optimizer(model.parameters(), optim_cfg(name=opt_name, lr=lr, momentum=0.9), device=torch.device("cpu"))
    sched = LRSchedule(opt, cfg, steps_per_epoch=steps_per_epoch)
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        opt.step() if opt_name != "sam" else opt.base.step()
        sched.step()
    return out, sched


def test_multistep_with_warmup_closed_form():
    cfg = sched_cfg(name="multistep", milestones=[1, 3], gamma=0.2, warmup_iters=4)
    got, _ = lrs(cfg, steps_per_epoch=5, n=20)
    for t, lr in enumerate(got):
        epoch = t // 5
        expected = 0.1 * min(1.0, t / 4) * 0.2 ** ((epoch >= 1) + (epoch >= 3))   # JEM: lr 0 at t = 0
        assert lr == pytest.approx(expected, rel=1e-9), t


def test_cosine_closed_form():
    cfg = sched_cfg(name="cosine", epochs=3)
    got, _ = lrs(cfg, steps_per_epoch=4, n=12)
    for t in (0, 3, 6, 11):
        assert got[t] == pytest.approx(0.05 * (1 + math.cos(math.pi * t / 12)), rel=1e-9)


def test_onecycle_closed_form_and_warmup_composition():
    cfg = sched_cfg(name="onecycle", epochs=2, pct_start=0.25)
    got, _ = lrs(cfg, steps_per_epoch=10, n=20)
    initial, peak_step = 0.1 / 25, 0.25 * 20 - 1           # torch defaults: div_factor 25, phase end pct*T - 1
    assert got[0] == pytest.approx(initial, rel=1e-9)
    assert max(got) == pytest.approx(0.1, rel=1e-9)
    t = 2
    assert got[t] == pytest.approx(0.1 + (initial - 0.1) / 2 * (1 + math.cos(math.pi * t / peak_step)), rel=1e-9)
    warm, _ = lrs(sched_cfg(name="onecycle", epochs=2, pct_start=0.25, warmup_iters=8), steps_per_epoch=10, n=20)
    for t in range(20):
        assert warm[t] == pytest.approx(got[t] * min(1.0, t / 8), rel=1e-9)


def test_scale_lr_and_state_roundtrip():
    cfg = sched_cfg(name="cosine", epochs=2, warmup_iters=3)
    _, sched = lrs(cfg, steps_per_epoch=5, n=4)
    sched.scale_lr(0.5)
    state = sched.state_dict()
    before = sched.get_last_lr()[0]
    _, other = lrs(cfg, steps_per_epoch=5, n=0)
    other.load_state_dict(state)
    assert other.get_last_lr()[0] == pytest.approx(before)
    assert before == pytest.approx(0.5 * 0.05 * (1 + math.cos(math.pi * 4 / 10)))


def test_sam_schedule_acts_on_base_optimizer():
    got, sched = lrs(sched_cfg(name="multistep", milestones=[1], gamma=0.1), steps_per_epoch=2, n=4, opt_name="sam")
    assert got == pytest.approx([0.1, 0.1, 0.01, 0.01])


def test_unknown_schedule_rejected():
    model = nn.Linear(2, 1)
    opt = build_optimizer(model.parameters(), optim_cfg(), device=torch.device("cpu"))
    with pytest.raises(ValueError, match="schedule 'poly'"):
        LRSchedule(opt, sched_cfg(name="poly"), steps_per_epoch=3)
