"""AutoAttack adapter on a linear Classifier, whose exact robust accuracy is known in closed form.

For logits f(x) = Wx + b the worst case over the L∞ ball ∩ [0,1] box is exact:
class j beats y somewhere in it iff min_x' (w_y - w_j)·x' + b_y - b_j <= 0, and
the minimiser is x'_i = clip(x_i - ε sign(w_y - w_j)_i, 0, 1) (the problem
separates per pixel). AutoAttack (APGD-T / FAB-T try every other class) must
find every such point and can never find more, so it must equal the exact
value, and PGD-20 (which only ascends CE) can only do worse or as well.
"""

import json

import pytest
import torch
from pyautoattack.state import EvaluationState
from torch import nn

from robust_ebm.attacks import AttackConfig, perturb
from robust_ebm.autoattack import run_autoattack
from robust_ebm.models import Classifier

EPS, N_CLASSES = 0.05, 10


def linear_classifier(seed=0):
    """A Classifier that is linear in x; its dropout makes it random unless it is in eval mode."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Dropout(0.5), nn.Flatten())
    return Classifier(nn.Identity(), nn.Identity(), trunk, nn.Linear(16, N_CLASSES),
                      num_classes=N_CLASSES, in_channels=1, image_size=4)


def points(model, n=20):
    torch.manual_seed(1)
    x = torch.rand(n, 1, 4, 4)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    y[:2] = (y[:2] + 1) % N_CLASSES  # two misclassified points
    return x, y


def exact_robust(model, x, y, eps):
    """Per-point robustness of a linear model under L∞ ∩ box, from its weights (see module docstring)."""
    model.eval()
    b = model(torch.zeros(1, 1, 4, 4))[0].detach()
    W = torch.autograd.functional.jacobian(lambda v: model(v.view(1, 1, 4, 4))[0], torch.zeros(16))
    xf = x.flatten(1)
    robust = []
    for xi, yi in zip(xf, y):
        ok = bool((W @ xi + b).argmax() == yi)
        for j in range(N_CLASSES):
            if ok and j != yi:
                d = W[yi] - W[j]
                ok = bool(d @ (xi - eps * d.sign()).clamp(0, 1) + b[yi] - b[j] > 0)
        robust.append(ok)
    return torch.tensor(robust)


def test_standard_autoattack_is_exact_on_a_linear_model_and_beats_pgd(tmp_path):
    model = linear_classifier()
    x, y = points(model)
    n = 16
    model.train()  # the adapter must evaluate in eval mode and give train mode back
    state_path = tmp_path / "aa_state.json"
    result = run_autoattack(model, x, y, eps=EPS, batch_size=16, seed=0, device="cpu", n_examples=n,
                            return_adv=True, state_path=state_path)
    assert model.training and model.trunk[0].training

    x, y = x[:n], y[:n]
    exact = exact_robust(model, x, y, EPS)
    assert 0 < exact.float().mean() < 1  # a meaningful instance: some points robust, some not
    assert result["n"] == n and result["version"] == "standard" and result["norm"] == "Linf"
    assert result["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    with torch.no_grad():
        clean = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert result["clean_accuracy"] == pytest.approx(clean) and clean == pytest.approx(14 / 16)
    assert result["per_example_robust"] == exact.tolist()
    assert result["robust_accuracy"] == pytest.approx(exact.float().mean().item())
    assert result["robust_accuracy"] <= result["clean_accuracy"]

    pgd = AttackConfig(eps=EPS, step=2 / 255, steps=20, random_start="uniform")
    with torch.no_grad():
        pgd_acc = (model(perturb(model, x, y, pgd, generator=torch.Generator().manual_seed(0))).argmax(1) == y)
    assert result["robust_accuracy"] <= pgd_acc.float().mean().item()

    x_adv = result["x_adv"]
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    broken = ~torch.tensor(result["per_example_robust"])
    with torch.no_grad():
        assert (model(x_adv[broken]).argmax(1) != y[broken]).all()
    json.dumps({k: v for k, v in result.items() if k != "x_adv"})  # the rest is JSON-ready

    # AutoAttack's own state file records the finished run; a rerun reads it back without attacking
    again = run_autoattack(model, x, y, eps=EPS, batch_size=16, seed=0, device="cpu", state_path=state_path,
                           verbose=False)
    assert again["per_example_robust"] == result["per_example_robust"]
    assert again["clean_accuracy"] == pytest.approx(clean)


def test_resume_from_a_state_file_runs_only_the_remaining_attacks(tmp_path):
    model = linear_classifier()
    x, y = points(model, n=16)
    exact = exact_robust(model, x, y, EPS)
    with torch.no_grad():
        clean_correct = model(x).argmax(1) == y
    # a run killed before FAB-T, whose other attacks (pretend) broke nothing; pyautoattack's own file format
    state_path = tmp_path / "aa_state.json"
    attacks = {"apgd-ce", "apgd-t", "fab-t", "square"}
    EvaluationState(attacks, path=state_path, _run_attacks={"apgd-ce", "apgd-t", "square"}, _robust_flags=clean_correct,
                    _clean_accuracy=clean_correct.float().mean().item()).to_disk(force=True)

    result = run_autoattack(model, x, y, eps=EPS, batch_size=8, seed=0, device="cpu", state_path=state_path,
                            verbose=False)
    assert result["per_example_robust"] == exact.tolist()  # FAB-T alone is exact on a linear model
    assert result["clean_accuracy"] == pytest.approx(clean_correct.float().mean().item())
    state = json.loads(state_path.read_text())
    assert set(state["_run_attacks"]) == attacks and state["_robust_flags"] == exact.tolist()


def test_bad_inputs_fail_before_attacking(tmp_path):
    model = linear_classifier()
    x, y = points(model, n=4)
    common = dict(batch_size=4, seed=0, device="cpu")
    with pytest.raises(ValueError, match="pixel units"):
        run_autoattack(model, x, y, eps=8, **common)
    with pytest.raises(ValueError, match="\\[0,1\\]"):
        run_autoattack(model, 2 * x - 1, y, eps=EPS, **common)
    with pytest.raises(ValueError, match="n_examples"):
        run_autoattack(model, x, y, eps=EPS, n_examples=5, **common)
    with pytest.raises(ValueError, match="version"):
        run_autoattack(model, x, y, eps=EPS, version="fast", **common)
    few = Classifier(nn.Identity(), nn.Identity(), nn.Flatten(), nn.Linear(16, 3),
                     num_classes=3, in_channels=1, image_size=4)
    with pytest.raises(ValueError, match="9 classes"):
        run_autoattack(few, x, y % 3, eps=EPS, **common)
    bad_state = tmp_path / "other.json"
    EvaluationState({"apgd-ce", "apgd-dlr"}, path=bad_state, _robust_flags=torch.ones(4, dtype=torch.bool)).to_disk(force=True)
    with pytest.raises(ValueError, match="another evaluation"):
        run_autoattack(model, x, y, eps=EPS, state_path=bad_state, **common)


def test_rand_version_uses_eot_and_stays_between_exact_and_clean():
    model = linear_classifier()
    x, y = points(model, n=16)
    result = run_autoattack(model, x, y, eps=EPS, version="rand", batch_size=16, seed=0, device="cpu")
    assert result["attacks"] == ["apgd-ce", "apgd-dlr"]
    exact = exact_robust(model, x, y, EPS).float().mean().item()
    assert exact <= result["robust_accuracy"] <= result["clean_accuracy"]
