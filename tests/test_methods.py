"""Every training method against its formula (papers.md §2), re-derived here with plain torch."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

from robust_ebm.attacks import AttackConfig
from robust_ebm.methods import REGISTRY, Batch, build_method, validate_params
from robust_ebm.methods.ebjdat import code_sampler
from robust_ebm.methods.weat import energy_weights
from robust_ebm.models import ModelConfig, build_model
from robust_ebm.sampling import SamplerConfig

K, B, SHAPE = 5, 6, (1, 8, 8)
EPS = 8 / 255
ATTACKS = {  # the objective each adversarial method expects
    "pgd_at": "ce", "trades": "kl", "mart": "ce", "mail_tr": "kl", "weat": "kl",
    "prejeat": "joint_energy", "jeat": "joint_energy",
}
SAMPLED = ("jeat", "jem", "jempp", "sadajem", "ebjdat")


def make_model(seed=0, norm="none", dtype=torch.float64):
    """float64 where losses are compared with formulas; float32 where the (float32) replay buffer is used."""
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="tiny_cnn", width=4, norm=norm, input_range="symmetric")
    return build_model(cfg, num_classes=K, in_channels=SHAPE[0], image_size=SHAPE[1]).to(dtype)


def make_cfg(loss, params=None, *, steps=2, buffer=2 * K, **sampler):
    attack = AttackConfig(eps=EPS, step=2 / 255, steps=2, objective=ATTACKS[loss]) if loss in ATTACKS else None
    sampler_cfg = SamplerConfig(steps=steps, buffer_size=buffer, **sampler) if loss in SAMPLED else None
    return SimpleNamespace(loss=loss, attack=attack, sampler=sampler_cfg, params=params or {},
                           data=SimpleNamespace(noise_std=0.0))


def make_method(loss, params=None, seed=0, **kw):
    return build_method(make_cfg(loss, params, **kw), num_classes=K, image_shape=SHAPE, stats=None,
                        device="cpu", generator=torch.Generator().manual_seed(seed))


def images(seed, n=B, dtype=torch.float64):
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def prepared_inputs(seed=1):
    """Fixed stand-ins for what prepare() returns: any images serve to check the loss formula."""
    x = images(seed)
    return {
        "x": x,
        "y": torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(seed)),
        "x_adv": (x + EPS * (2 * images(seed + 1) - 1)).clamp(0, 1),
        "x_tilde": (x + EPS * (2 * images(seed + 2) - 1)).clamp(0, 1),
        "x_px": images(seed + 3),
        "x_sgld": images(seed + 4),
    }


# ---------------------------------------------------------------- the formulas, written out independently

def lse(logits):
    return torch.logsumexp(logits, dim=1)


def kl_rows(nat, adv):
    """KL(p_nat || p_adv) per sample, as TRADES writes it: KLDivLoss(log_softmax(adv), softmax(nat))."""
    return F.kl_div(F.log_softmax(adv, 1), F.softmax(nat, 1), reduction="none").sum(1)


def reference_loss(loss, model, p, params, epoch):
    y = p["y"]
    f = {k: model(p[k]) for k in ("x", "x_adv", "x_tilde", "x_px", "x_sgld")}
    ce = F.cross_entropy(f["x"], y)
    ce_adv = F.cross_entropy(f["x_adv"], y)
    kl = kl_rows(f["x"], f["x_adv"])
    # JEM code: f(x) = logsumexp = -E(x); l_p_x = -(f(x_data).mean() - f(x_sample).mean())
    px = -(lse(f["x_px"]).mean() - lse(f["x_sgld"]).mean())
    if loss == "standard":
        return ce
    if loss in ("pgd_at", "prejeat"):
        return ce_adv
    if loss == "trades":
        return ce + 6.0 * kl.sum() / B
    if loss == "mart":
        adv_probs = F.softmax(f["x_adv"], 1)
        top2 = torch.argsort(adv_probs, 1)[:, -2:]
        new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
        loss_adv = F.cross_entropy(f["x_adv"], y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
        true_probs = F.softmax(f["x"], 1)[torch.arange(B), y]
        return loss_adv + 5.0 * (kl * (1.0000001 - true_probs)).sum() / B
    if loss == "mail_tr":
        if epoch <= params["warmup_epochs"]:
            return ce + 5.0 * kl.sum() / B
        probs = F.softmax(f["x_adv"], 1).detach()
        p_true = probs[torch.arange(B), y]
        p_2nd = torch.stack([max(probs[i, k] for k in range(K) if k != y[i]) for i in range(B)])
        w = 3 * torch.sigmoid(2.0 * (p_2nd - p_true + 0.0))
        return ce + 5.0 * (w * kl).sum() / B
    if loss == "weat":
        w = 1 / torch.log(1 + torch.exp(lse(f["x"]).detach().abs()))
        ce_rows = F.cross_entropy(f["x" if params["variant"] == "nat" else "x_adv"], y, reduction="none")
        return (w * ce_rows).sum() / B + params.get("beta", 6.0) * (w * kl).sum() / B
    if loss == "jeat":  # [E(x_adv,y) - E(x_adv)] + [E(x_adv) - E(x~)], energies of x_adv, not x
        e_xy = -f["x_adv"][torch.arange(B), y]
        return (e_xy + lse(f["x_adv"])).mean() + (-lse(f["x_adv"])).mean() - (-lse(f["x_sgld"])).mean()
    if loss in ("jem", "jempp", "sadajem"):
        return px + ce
    if loss == "ebjdat":
        px_xadv = -(lse(f["x_px"]).mean() - lse(f["x_tilde"]).mean())
        return 1.0 * px + 1.0 * ce + 0.1 * px_xadv + 1.0 * F.cross_entropy(f["x_tilde"], y)
    raise KeyError(loss)


CASES = [(name, {}, 0) for name in REGISTRY if name not in ("mail_tr", "weat")] + [
    ("mail_tr", {"warmup_epochs": 3}, 3), ("mail_tr", {"warmup_epochs": 3}, 4),
    ("weat", {"variant": "nat"}, 0), ("weat", {"variant": "adv", "beta": 7.0}, 0),
]


@pytest.mark.parametrize("loss,params,epoch", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_loss_matches_formula(loss, params, epoch):
    model, method, p = make_model(), make_method(loss, params), prepared_inputs()
    out = method.loss(model, p, epoch=epoch)
    expected = reference_loss(loss, model, p, params, epoch)
    assert out.loss.shape == ()
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)
    assert all(isinstance(v, float) for v in out.terms.values())
    assert all(not e.requires_grad and e.shape == (B,) for e in out.energies.values())


@pytest.mark.parametrize("loss", list(REGISTRY))
def test_sgd_step_lowers_own_objective(loss):
    model, method, p = make_model(), make_method(loss), prepared_inputs()
    before = method.loss(model, p, epoch=0).loss
    model.zero_grad()
    before.backward()
    with torch.no_grad():
        for w in model.parameters():
            w -= 1e-3 * w.grad
    assert method.loss(model, p, epoch=0).loss < before


# ---------------------------------------------------------------- method-specific properties

def test_weat_weights_are_detached_inverse_softplus_energy():
    model, p = make_model(), prepared_inputs()
    logits = model(p["x"])
    w = energy_weights(logits)
    torch.testing.assert_close(w, 1 / F.softplus(lse(logits).abs()))
    assert not w.requires_grad and w.max() <= 1 / torch.log(torch.tensor(2.0, dtype=w.dtype))

    method = make_method("weat")
    grads = lambda loss: torch.autograd.grad(loss, list(model.parameters()))  # noqa: E731
    got = grads(method.loss(model, p, epoch=0).loss)
    detached = grads(reference_loss("weat", model, p, {"variant": "nat"}, 0))
    # the same loss with gradient flowing through w: must differ, or the check above proves nothing
    f_nat, f_adv = model(p["x"]), model(p["x_adv"])
    w_live = 1 / F.softplus(lse(f_nat).abs())
    live = grads((w_live * F.cross_entropy(f_nat, p["y"], reduction="none")).mean()
                 + 6.0 * (w_live * kl_rows(f_nat, f_adv)).mean())
    for g, d in zip(got, detached):
        torch.testing.assert_close(g, d)
    assert any(not torch.allclose(g, l) for g, l in zip(got, live))


def test_mail_switches_at_warmup():
    model, p = make_model(), prepared_inputs()
    mail, trades = make_method("mail_tr", {"warmup_epochs": 4, "beta": 6.0}), make_method("trades")
    assert mail.loss(model, p, epoch=4).loss == trades.loss(model, p, epoch=4).loss
    assert mail.loss(model, p, epoch=4).terms["w_mean"] == 1.0
    after = mail.loss(model, p, epoch=5)
    assert after.loss != trades.loss(model, p, epoch=5).loss
    assert 0 < after.terms["w_mean"] < 3


def test_jeat_positive_is_x_adv():
    model, method = make_model(dtype=torch.float32), make_method("jeat")
    x = images(5, dtype=torch.float32)
    y = torch.arange(B) % K
    prepared = method.prepare(model, Batch(x=x, y=y), epoch=0)
    dist = (prepared["x_adv"] - x).abs().amax()
    assert 0 < dist <= EPS + 1e-9
    out = method.loss(model, prepared, epoch=0)
    assert method.loss(model, dict(prepared, x=images(6, dtype=torch.float32)), epoch=0).loss == out.loss  # x unused
    torch.testing.assert_close(out.energies["E_x/adv"], -lse(model(prepared["x_adv"])).detach())
    with_x = dict(prepared, x_adv=x)  # the loss moves when the positive moves
    assert method.loss(model, with_x, epoch=0).loss != out.loss


def test_ebjdat_code_sampler_leaves_the_ball_paper_variant_stays():
    model, x = make_model(), images(7)
    y = torch.arange(B) % K
    eps, step = 2 / 255, 2 / 255
    x_code = code_sampler(model, x, y, eps=eps, step=step, steps=5, group=1, generator=torch.Generator().manual_seed(0))
    assert (x_code - x).abs().amax() > eps + 1e-6  # no projection: up to eps + 5*step
    assert (x_code - x).abs().amax() <= eps + 5 * step + 1e-9
    assert 0 <= x_code.min() and x_code.max() <= 1
    params = {"sampler_variant": "paper", "eps": eps, "step": step}
    x_paper = make_method("ebjdat", params).sample_xadv(model, x, y)
    assert (x_paper - x).abs().amax() <= eps + 1e-6


@pytest.mark.parametrize("group", [1, 2])
def test_ebjdat_vectorised_sampler_equals_micro_batches(group):
    """The code runs chunks of 2; one vectorised pass with groups of `group` (≤ 2) gives the same x̃."""
    model, x = make_model(norm="batch"), images(8)
    y = torch.arange(B) % K
    kw = dict(eps=0.0, step=1 / 255, steps=3, group=group)
    whole = code_sampler(model, x, y, **kw)
    chunks = torch.cat([code_sampler(model, x[i:i + 2], y[i:i + 2], **kw) for i in range(0, B, 2)])
    torch.testing.assert_close(whole, chunks)
    assert model.training  # the sampler restores the caller's mode


def test_ebjdat_code_sampler_descends_joint_energy():
    model, x = make_model(), images(9)
    y = torch.arange(B) % K
    x_t = code_sampler(model, x, y, eps=0.0, step=1 / 255, steps=3, group=1)
    e_xy = lambda z: -model(z)[torch.arange(B), y]  # noqa: E731
    assert e_xy(x_t).mean() < e_xy(x).mean()  # the code ascends logit_y, i.e. lowers E(x̃, y)


def test_validate_params_names_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown key 'betta'.*Allowed keys: beta, variant"):
        validate_params("weat", {"betta": 6.0})
    with pytest.raises(ValueError, match=r"unknown method loss 'jem3'"):
        validate_params("jem3", {})
    with pytest.raises(ValueError, match="sampler_variant"):
        validate_params("ebjdat", {"sampler_variant": "maybe"})
    assert validate_params("ebjdat", {"eps": "4/255"}).eps == pytest.approx(4 / 255)


def test_wrong_attack_objective_is_rejected():
    cfg = make_cfg("trades")
    cfg.attack = AttackConfig(objective="ce")
    with pytest.raises(ValueError, match="trades.*objective kl"):
        build_method(cfg, num_classes=K, image_shape=SHAPE, device="cpu", generator=torch.Generator())


def test_jem_needs_px_stream():
    method = make_method("jem")
    assert method.needs_px_stream
    with pytest.raises(ValueError, match="x_px"):
        method.prepare(make_model(), Batch(x=images(0), y=torch.zeros(B, dtype=torch.long)), epoch=0)


def test_jem_state_dict_round_trip_and_remedy():
    model, method = make_model(dtype=torch.float32), make_method("jem", seed=3)
    batch = Batch(x=images(1, dtype=torch.float32), y=torch.arange(B) % K, x_px=images(2, dtype=torch.float32))
    method.prepare(model, batch, epoch=0)
    assert "2 -> 4" in method.apply_remedy("more_sgld_steps")
    state = method.state_dict()

    fresh = make_method("jem", seed=99)
    assert not torch.equal(fresh.samples(), method.samples())
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.samples(), method.samples())
    assert fresh.sampler.cfg.steps == 4
    # resumed and original continue identically (same buffer draws, same Langevin noise stream)
    fresh.generator.set_state(method.generator.get_state())
    a = method.prepare(model, batch, epoch=1)["x_sgld"]
    b = fresh.prepare(model, batch, epoch=1)["x_sgld"]
    torch.testing.assert_close(a, b)


def tiny_stats(num_classes, shape, rank=3, seed=0):
    """Class statistics in the layout sampling's informative inits read (mean, low-rank basis, scales)."""
    g = torch.Generator().manual_seed(seed)
    d = shape[0] * shape[1] * shape[2]
    basis = torch.linalg.qr(torch.randn(num_classes, d, rank, generator=g)).Q
    from robust_ebm.data import ClassStats

    return ClassStats(mean=torch.rand((num_classes, *shape), generator=g), basis=basis,
                      scales=0.1 * torch.ones(num_classes, rank), counts=torch.full((num_classes,), 10),
                      total_variance=torch.full((num_classes,), 0.01 * rank))


def test_params_yaml_methods_build_and_train_one_step():
    """Every method of params.yaml resolves, and its smoke-profile config runs prepare → loss → backward."""
    path = Path(__file__).resolve().parents[1] / "params.yaml"
    from robust_ebm.config import load_params

    params = load_params(path)
    for name, entry in yaml.safe_load(path.read_text())["methods"].items():
        assert entry["loss"] in REGISTRY, f"methods.{name}.loss '{entry['loss']}' is not a registered method"
    prof = params.profile_config("smoke")
    num_classes, shape = 10, (1, 8, 8)
    for name, cfg in prof.methods.items():
        torch.manual_seed(0)
        model = build_model(prof.models[cfg.model], num_classes=num_classes, in_channels=1, image_size=8)
        method = build_method(cfg, num_classes=num_classes, image_shape=shape, stats=tiny_stats(num_classes, shape),
                              device="cpu", generator=torch.Generator().manual_seed(0))
        x = torch.rand((4, *shape))
        batch = Batch(x=x, y=torch.arange(4), x_px=torch.rand((4, *shape)) if method.needs_px_stream else None)
        out = method.loss(model, method.prepare(model, batch, epoch=0), epoch=0)
        out.loss.backward()
        assert torch.isfinite(out.loss), name
        assert all(torch.isfinite(w.grad).all() for w in model.parameters() if w.grad is not None), name


@pytest.mark.parametrize("norm, dropout, one_forward", [("none", 0.0, True), ("batch", 0.0, False), ("none", 0.3, False)])
def test_forward_each_concatenates_only_without_batch_statistics_or_dropout(norm, dropout, one_forward):
    """One forward of cat(xs) where every image is independent (same logits); else one forward per batch,
    in order, so BatchNorm's running statistics and the dropout draws are those of separate forwards."""
    from robust_ebm.methods.base import forward_each

    torch.manual_seed(0)
    cfg = ModelConfig(arch="wrn", depth=10, width=1, norm=norm, dropout=dropout, block="jem")
    model = build_model(cfg, num_classes=K, in_channels=SHAPE[0], image_size=SHAPE[1]).double().train()
    twin = build_model(cfg, num_classes=K, in_channels=SHAPE[0], image_size=SHAPE[1]).double().train()
    twin.load_state_dict(model.state_dict())
    xs = [torch.rand(n, *SHAPE, dtype=torch.float64) for n in (3, 4, 2)]
    calls = []
    model.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    torch.manual_seed(1)
    ours = forward_each(model, *xs)
    torch.manual_seed(1)
    separate = [twin(x) for x in xs]
    assert calls == ([9] if one_forward else [3, 4, 2])
    for a, b in zip(ours, separate):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=key)
    model.eval()   # eval mode: BatchNorm uses running statistics, dropout is off: always one forward
    calls.clear()
    forward_each(model, *xs)
    assert calls == [9]


@pytest.mark.parametrize("momentum", [0.1, 0.9, None])
def test_trades_batchnorm_statistics_equal_three_forwards(momentum):
    """TRADES' x, x_adv, x train-mode forwards (trades.py:79-82): two forwards with adjusted momenta leave the
    running statistics and counts of all three; momentum None (cumulative average) forwards x again."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="tiny_cnn", width=4, norm="batch", bn_momentum=0.5)
    model = build_model(cfg, num_classes=K, in_channels=SHAPE[0], image_size=SHAPE[1]).double().train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    reference = build_model(cfg, num_classes=K, in_channels=SHAPE[0], image_size=SHAPE[1]).double().train()
    reference.load_state_dict(model.state_dict())
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    x, x_adv = images(0), images(1)
    method = make_method("trades")
    logits, logits_adv = method.forward(model, {"x": x, "x_adv": x_adv})
    expected = reference(x), reference(x_adv)
    reference(x)
    torch.testing.assert_close(logits, expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(logits_adv, expected[1], rtol=0, atol=1e-12)
    for (key, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12, msg=key)
