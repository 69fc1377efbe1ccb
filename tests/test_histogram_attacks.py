"""Per-attack components for WEAT Fig.2: pyautoattack's own classes with AutoAttack 'standard' settings,
the shared conventions (only correct points attacked, budget, RNG left alone) and clear config errors."""

import pytest
import torch
from pydantic import ValidationError
from pyautoattack import AutoAttack

from helpers import tiny_classifier
from robust_ebm.histogram_attacks import (NAMES, ComponentUnavailable, HistogramAttacksConfig,
                                          build_component)

CPU = torch.device("cpu")
# a large budget and few iterations: a tiny random CNN is broken on some points, each attack in well under a second
CHEAP = dict(eps=0.3, step=0.075, pgd_steps=5, apgd_iters=10, fab_iters=10, square_queries=100)


def case(classes=10, n=16):
    model = tiny_classifier(classes=classes).requires_grad_(False)
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % classes  # three misclassified points
    return model, x, y


def test_unknown_or_repeated_attack_names_are_clear_errors():
    with pytest.raises(ValidationError) as info:
        HistogramAttacksConfig(attacks=["apgd", "square", "cw"])
    msg = str(info.value)
    assert "unknown attack(s) ['apgd', 'cw']" in msg and "valid names: " + ", ".join(NAMES) in msg
    with pytest.raises(ValidationError, match="more than once"):
        HistogramAttacksConfig(attacks=["square", "square"])
    with pytest.raises(ValidationError):
        HistogramAttacksConfig(eps=8)  # pixel units: at most 1


def test_components_use_autoattack_standard_settings():
    """Our objects against the ones AutoAttack(version='standard') itself builds (pyautoattack 0.2.0)."""
    model = tiny_classifier(classes=10)
    cfg = HistogramAttacksConfig()
    aa = AutoAttack(model, eps=cfg.eps, norm="Linf", version="standard", seed=cfg.seed, device=CPU)
    ours = {name: build_component(name, model, cfg, num_classes=10, device=CPU).impl for name in NAMES}
    for name, theirs in (("apgd_ce", aa.apgd), ("apgd_t", aa.apgd_targeted)):
        for attr in ("n_iter", "n_restarts", "thr_decr", "eot_iter", "eps", "norm", "seed", "use_largereps"):
            assert getattr(ours[name], attr) == getattr(theirs, attr), (name, attr)
    assert ours["apgd_ce"].loss == "ce" and ours["apgd_dlr"].loss == "dlr"
    assert ours["apgd_t"].n_target_classes == aa.apgd_targeted.n_target_classes == 9
    for attr in ("n_iter", "n_restarts", "eps", "norm", "alpha_max", "eta", "beta", "n_target_classes", "seed"):
        assert getattr(ours["fab_t"], attr) == getattr(aa.fab, attr), attr
    assert ours["fab_t"].targeted  # AutoAttack sets it when it runs 'fab-t'
    for attr in ("n_iter", "n_restarts", "eps", "norm", "alpha_max", "eta", "beta", "seed"):
        assert getattr(ours["fab"], attr) == getattr(aa.fab, attr), attr
    assert not ours["fab"].targeted  # WEAT's notebook: torchattacks.FAB(multi_targeted=False)
    for attr in ("p_init", "n_restarts", "eps", "norm", "loss", "rescale_schedule", "targeted", "seed"):
        assert getattr(ours["square"], attr) == getattr(aa.square, attr), attr
    assert ours["square"].n_queries == 1000 and aa.square.n_queries == 5000  # WEAT's notebook, not AutoAttack's
    assert ours["pgd_kl"].objective == "kl" and ours["cw_linf"].objective == "cw_margin"
    assert ours["cw_linf"].steps == ours["pgd_kl"].steps == 20


@pytest.mark.parametrize("name", NAMES)
def test_each_component_attacks_only_correct_points_inside_the_budget(name):
    model, x, y = case()
    build = lambda: build_component(name, model, HistogramAttacksConfig(**CHEAP), num_classes=10, device=CPU)  # noqa: E731
    comp = build()
    rng = torch.random.get_rng_state()
    x_adv = comp.perturb(x, y)
    assert torch.equal(rng, torch.random.get_rng_state()), "pyautoattack's reseeding leaked into the caller's RNG"
    assert torch.equal(x_adv, build().perturb(x, y)), "the same seed must give the same images"
    with torch.no_grad():
        correct_clean, correct_adv = model(x).argmax(1) == y, model(x_adv).argmax(1) == y
    assert not (correct_adv & ~correct_clean).any()                  # never better than clean, point by point
    assert torch.equal(x_adv[~correct_clean], x[~correct_clean])     # misclassified points are not attacked
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= CHEAP["eps"] + 1e-6 or not comp.bounded  # cw_l2 has no eps budget
    assert "not the headline" in comp.protocol and "REDUCED" in comp.protocol


def test_protocols_name_the_exact_implementation():
    model = tiny_classifier(classes=10)
    protocols = {n: build_component(n, model, HistogramAttacksConfig(), num_classes=10, device=CPU).protocol
                 for n in NAMES}
    for name, words in {"pgd_kl": ["TRADES KL", "PGD-20 on kl", "N(0, 0.001^2)"],
                        "apgd_ce": ["pyautoattack 0.2.0 APGDAttack(loss='ce', n_iter 100,"],
                        "apgd_dlr": ["APGDAttack(loss='dlr'"],
                        "apgd_t": ["APGDAttack_targeted", "n_target_classes 9"],
                        "fab_t": ["FABAttack_PT(targeted", "n_target_classes 9"],
                        "square": ["SquareAttack", "n_queries 1000", "AutoAttack 'standard': 5000"],
                        "fab": ["FABAttack_PT(untargeted", "multi_targeted=False"],
                        "cw_l2": ["torchattacks 3.5.1 CW(c=1, kappa=0, steps=20, lr=0.01)", "NO eps budget"],
                        "cw_linf": ["PGD on the Carlini-Wagner margin", "PGD-20 on cw_margin",
                                    "NOT ART's CarliniLInfMethod"]}.items():
        assert all(w in protocols[name] for w in words), (name, protocols[name])
        assert ("eps 8/255" in protocols[name] or name == "cw_l2") and "REDUCED" not in protocols[name]


def test_few_classes_lower_the_targets_or_make_the_attack_unavailable():
    model = tiny_classifier(classes=3)
    cfg = HistogramAttacksConfig()
    with pytest.raises(ComponentUnavailable, match=">= 4 classes"):
        build_component("apgd_t", model, cfg, num_classes=3, device=CPU)
    fab = build_component("fab_t", model, cfg, num_classes=3, device=CPU)
    assert fab.impl.n_target_classes == 2 and "2 (all other classes of 3" in fab.protocol
    with pytest.raises(ComponentUnavailable, match=">= 3 classes"):
        build_component("apgd_dlr", tiny_classifier(classes=2), cfg, num_classes=2, device=CPU)
    with pytest.raises(ValueError, match="valid names"):
        build_component("fgsm", model, cfg, num_classes=3, device=CPU)
