"""Generation against the official code (fixtures from tests/golden/gen_generate.py, float64, tolerance 1e-8).

  weat_pca        sampling.init_pca / weat_pca_draw + data.weat_pca_rank vs WEAT utils_func.sample_x0_pca (sklearn)
  weat_momentum   sampling.sgld (momentum, update clamp) vs WEAT utils.new_samples
  santurkar_l2    generate.robustness_targeted_l2 vs robustness Attacker (targeted L2, use_best)
  jeat_eq16/17    sampling.sgld (coupled) vs the paper's formulas written independently
  buffer top      metrics.buffer_protocol.top_confident vs EB-JDAT / SADA-JEM cond_is_fid
  weat_cw         histogram_attacks.cw_l2 vs torchattacks 3.5.1 CW (WEAT Fig.2's CW panel)
"""

from __future__ import annotations

import math

import pytest
import torch

from golden.common import assert_close, load_fixture
from golden.gen_generate import SHAPE, draws, tiny_net
from robust_ebm.data import class_stats, weat_pca_rank, weat_pca_singular_values
from robust_ebm.generate import robustness_targeted_l2
from robust_ebm.histogram_attacks import cw_l2
from robust_ebm.metrics.buffer_protocol import top_confident
from robust_ebm.sampling import SamplerConfig, init_pca, sgld, weat_pca_draw


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _generator_gives(seed: int, stored: torch.Tensor) -> None:
    """Our samplers draw from a seeded torch.Generator; the fixture stored what it gave when it was made."""
    (again,) = draws(seed, [stored.shape])
    assert torch.equal(again, stored), f"torch.Generator({seed}) no longer gives the stored draws: regenerate the fixture"


def test_weat_pca_init_matches_sklearn_pca_in_weats_code():
    fx = load_fixture("gen_weat_pca")
    images, labels = fx["inputs"]["images"], fx["inputs"]["labels"]
    stats = class_stats(images, labels, int(labels.max()) + 1, max_rank=10_000, dtype=torch.float64)
    sigma = fx["inputs"]["sigma_pca"]
    for case in fx["inputs"]["cases"]:
        ref, k, fraction = fx["outputs"][case["key"]], case["k"], case["fraction"]
        r = weat_pca_rank(stats, k, fraction)
        assert r == ref["n_components"], f"{case['key']}: {r} components, WEAT keeps {ref['n_components']}"
        mean = stats.mean[k].flatten()
        assert_close(mean, ref["mean"], what=f"{case['key']} class mean")
        assert_close(weat_pca_singular_values(stats, k, r), ref["singular_values"], what=f"{case['key']} singular values")
        components = stats.basis[k, :, :r].T
        signs = torch.sign((components * ref["components"]).sum(1))   # eigenvectors are defined up to sign
        assert_close(components * signs[:, None], ref["components"], what=f"{case['key']} principal directions")
        x0 = weat_pca_draw(mean, components, weat_pca_singular_values(stats, k, r), case["z"] * signs, sigma)
        assert_close(x0.view(-1, *SHAPE), ref["x0"], what=f"{case['key']} x0")
    assert {c["key"]: fx["outputs"][c["key"]]["n_components"] for c in fx["inputs"]["cases"]}["class0_rv0.0095"] == 0


def test_init_pca_draws_weats_distribution_from_the_generator():
    fx = load_fixture("gen_weat_pca")
    images, labels = fx["inputs"]["images"], fx["inputs"]["labels"]
    stats = class_stats(images, labels, 2, max_rank=10_000, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = init_pca(stats, torch.ones(4, dtype=torch.long), fraction=0.6, sigma=0.05, generator=g)
    r = weat_pca_rank(stats, 1, 0.6)
    z = torch.randn((4, r), generator=torch.Generator().manual_seed(0), dtype=torch.float32).double()
    expected = weat_pca_draw(stats.mean[1].flatten(), stats.basis[1, :, :r].T, weat_pca_singular_values(stats, 1, r), z, 0.05)
    assert_close(x.flatten(1), expected, what="init_pca = weat_pca_draw of the generator's z")


def test_weat_momentum_sgld_matches_weats_new_samples(f64):
    fx = load_fixture("gen_weat_momentum")
    net = tiny_net(fx["inputs"]["net"])
    x0, labels = fx["inputs"]["x0"], fx["inputs"]["labels"]
    for case in fx["inputs"]["cases"]:
        eta = case["eta"]
        cfg = SamplerConfig(kind="sgld", energy="joint", steps=case["steps"], step_size=eta / 2,
                            noise_std=math.sqrt(2 * eta) * fx["inputs"]["noise_variance"], momentum=case["momentum"],
                            update_clip=case["eps"], clamp=True, model_mode="eval")
        g = torch.Generator().manual_seed(case["seed"])
        assert torch.equal(torch.stack(draws(case["seed"], [x0.shape] * case["steps"])), case["z"])
        ours = sgld(net, x0, cfg, y=labels, generator=g)
        assert_close(ours, fx["outputs"][case["name"]], what=f"weat_momentum ({case['name']}) samples")


def test_santurkar_keeps_the_best_iterate_as_robustness_does(f64):
    fx = load_fixture("gen_santurkar_l2")
    net = tiny_net(fx["inputs"]["net"])
    x0, target = fx["inputs"]["x0"], fx["inputs"]["target"]
    for case in fx["inputs"]["cases"]:
        _generator_gives(case["seed"], case["r"])
        ours = robustness_targeted_l2(net, x0, target, eps=case["eps"], step_size=case["step"],
                                      iterations=case["iterations"], random_start=case["random_start"],
                                      generator=torch.Generator().manual_seed(case["seed"]))
        ref = fx["outputs"][case["name"]]
        assert_close(ours, ref["best"], what=f"santurkar_l2 ({case['name']}) best iterate")
        assert (ours - ref["last"]).abs().max() > 1e-3   # the fixture is one where the last iterate is not the best


def test_jeat_eq16_eq17_are_the_papers_formulas(f64):
    fx = load_fixture("gen_jeat_eq")
    net = tiny_net(fx["inputs"]["net"])
    x0, y = fx["inputs"]["x0"], fx["inputs"]["y"]
    for case in fx["inputs"]["cases"]:
        assert torch.equal(torch.stack(draws(case["seed"], [x0.shape] * case["steps"])), case["z"])
        cfg = SamplerConfig(kind="sgld", energy="joint" if case["eq"] == "eq17" else "ce", steps=case["steps"],
                            step_size=case["eta"], coupled=True, clamp=False, model_mode="eval")
        ours = sgld(net, x0, cfg, y=y, generator=torch.Generator().manual_seed(case["seed"]))
        assert_close(ours, fx["outputs"][case["eq"]], what=f"jeat {case['eq']} chain")


def test_buffer_top_confident_selection_matches_cond_is_fid(f64):
    fx = load_fixture("gen_buffer_top")
    net = tiny_net(fx["inputs"]["net"])
    with torch.no_grad():
        logits = net(fx["inputs"]["buffer"])
    for repo, chosen in fx["outputs"].items():
        for ratio in fx["inputs"]["ratios"]:
            ours = top_confident(logits, ratio, fx["inputs"]["num_classes"])
            assert torch.equal(ours, chosen[str(ratio)]), f"{repo} ratio {ratio}: other rows or order than cond_is_fid"


def test_cw_l2_is_torchattacks_cw_as_weat_calls_it(f64):
    fx = load_fixture("gen_weat_cw")
    net = tiny_net(fx["inputs"]["net"])
    x, y = fx["inputs"]["x"], fx["inputs"]["y"]
    for case in fx["inputs"]["cases"]:
        ours = cw_l2(net, x, y, c=1.0, kappa=0.0, steps=case["steps"], lr=case["lr"])
        assert_close(ours, fx["outputs"][case["name"]], what=f"cw_l2 ({case['name']}) images")
    assert (fx["outputs"]["stronger"] - x).abs().max() > 1e-3   # the fixture breaks some points
