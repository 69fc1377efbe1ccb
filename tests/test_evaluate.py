"""Evaluation stage: attacks reach analytic worst cases, JSON columns, energies, EOT, user checkpoints."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import robust_ebm.evaluate as ev_mod
from robust_ebm.config import EvaluationConfig, TrainingConfig, load_params
from robust_ebm.data import Splits, TensorSplit
from robust_ebm.evaluate import DETERMINISTIC, ENTRY_KEYS, ExpectedLogSoftmax, evaluate_stage
from robust_ebm.models import ModelConfig, build_model
from helpers import tiny_classifier

ROOT = Path(__file__).resolve().parents[1]
EPS = 8 / 255


class Linear(nn.Module):
    """f(x) = W flatten(x) + b on 1x4x4 images: every attack on it has a closed-form optimum."""

    def __init__(self, num_classes=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(16, num_classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(num_classes, 16, generator=g))
            self.fc.bias.copy_(-0.5 * self.fc.weight.sum(1))  # f(x) = W (x - 1/2): margins centred on 0
        self.num_classes, self.in_channels, self.image_size = num_classes, 1, 4

    def forward(self, x):
        return self.fc(x.flatten(1))


def _evaluation(**update):
    """params.yaml's evaluation section with nested overrides (histogram attacks off unless given)."""
    base = load_params(ROOT / "params.yaml").evaluation.model_dump()
    for key, value in {"batch_size": 32, "histogram_attacks": None, **update}.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return EvaluationConfig.model_validate(base)


def _run(evaluation, **kw):
    return SimpleNamespace(evaluation=evaluation, seed=0, device="cpu", method_name="standard", training=TrainingConfig(),
                           **kw)


def _splits(x_u8, y):
    split = TensorSplit(x_u8, y)
    return Splits(train=split, valid=split, test=split, classes=[str(k) for k in range(int(y.max()) + 1)])


def _robust_margin(model, x, y, eps):
    """Exact worst-case margin of a 2-class linear model under the L∞ ball (box [0,1] not binding)."""
    w = model.fc.weight.detach()
    dw = w[y] - w[1 - y]
    margin = (model(x)[torch.arange(len(y)), y] - model(x)[torch.arange(len(y)), 1 - y]).detach()
    return margin - eps * dw.abs().sum(1)


@pytest.fixture
def linear_case(monkeypatch):
    """64 test images in [0.3,0.7] (so an 8/255 ball never meets the box), labels = clean predictions,
    kept away from the robustness threshold of both budgets so float error cannot flip a decision."""
    model = Linear()
    g = torch.Generator().manual_seed(1)
    x_u8 = torch.randint(77, 178, (400, 1, 4, 4), generator=g, dtype=torch.uint8)
    x = x_u8.float() / 255
    y = model(x).argmax(1)
    keep = (_robust_margin(model, x, y, EPS).abs() > 1e-3) & (_robust_margin(model, x, y, EPS / 2).abs() > 1e-3)
    x_u8, y = x_u8[keep][:64], y[keep][:64]
    monkeypatch.setattr(ev_mod, "load_prepared", lambda d: (_splits(x_u8, y), None))
    monkeypatch.setattr(ev_mod, "load_for_run", lambda run, p, device=None, **kw: (model, {}))
    monkeypatch.setattr(ev_mod, "run_autoattack", _fake_autoattack)
    return model, x_u8.float() / 255, y


def _fake_autoattack(model, x, y, *, eps, norm, version, batch_size, seed, device, n_examples=None, return_adv=False):
    """Stand-in with run_autoattack's return shape (the real one needs >= 10 classes; tested below)."""
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    return {"n": len(y), "clean_accuracy": robust.float().mean().item(), "robust_accuracy": robust.float().mean().item(),
            "attacks": ["stand-in"], "flags": [], "per_example_robust": robust.tolist(), "x_adv": x.clone()}


def _model_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"stand-in; load_classifier is patched")
    return path


def test_pgd_and_energy_attack_reach_the_analytic_worst_case(linear_case, tmp_path):
    model, x, y = linear_case
    out = tmp_path / "eval.json"
    result = evaluate_stage(_run(_evaluation()), tmp_path, _model_file(tmp_path), out)
    cols = result["columns"]
    analytic = (_robust_margin(model, x, y, EPS) > 0).float().mean().item()
    assert 0 < analytic < 1, "the case must separate robust from non-robust points"
    assert cols["pgd"]["accuracy"] == pytest.approx(analytic)
    assert cols["ebjdat_scale"]["accuracy"] == pytest.approx((_robust_margin(model, x, y, EPS / 2) > 0).float().mean().item())
    # JEAT's energy attack ascends E(x,y) = -w_y.x - b_y only: its optimum is x - eps*sign(w_y)
    x_energy = x - EPS * model.fc.weight.detach()[y].sign().view(-1, 1, 4, 4)
    with torch.no_grad():
        assert cols["energy_attack"]["accuracy"] == pytest.approx((model(x_energy).argmax(1) == y).float().mean().item())
    assert cols["clean"]["accuracy"] == 1.0


def test_json_columns_keys_and_pixel_units(linear_case, tmp_path):
    out = tmp_path / "eval.json"
    evaluate_stage(_run(_evaluation()), tmp_path, _model_file(tmp_path), out)
    saved = json.loads(out.read_text())
    cols = saved["columns"]
    assert set(cols) == {"clean", "pgd", "energy_attack", "ebjdat_scale", "autoattack", "eot"}
    for name, col in cols.items():
        assert set(ENTRY_KEYS) <= set(col), name
    assert cols["pgd"]["eps_pixel"] == pytest.approx(8 / 255) and cols["pgd"]["step_pixel"] == pytest.approx(2 / 255)
    assert cols["pgd"]["steps"] == 20 and cols["pgd"]["objective"] == "ce"
    assert cols["energy_attack"]["objective"] == "joint_energy"
    assert cols["energy_attack"]["eps_pixel"] == cols["pgd"]["eps_pixel"]
    # EB-JDAT's released eval: 8/255 and 1/255 in [-1,1] units = half of that in pixel units
    assert cols["ebjdat_scale"]["eps_pixel"] == pytest.approx(cols["pgd"]["eps_pixel"] / 2)
    assert cols["ebjdat_scale"]["step_pixel"] == pytest.approx(0.5 / 255)
    assert "8/255 in [-1,1] units" in cols["ebjdat_scale"]["protocol"]
    for name in ("pgd", "energy_attack", "ebjdat_scale"):  # the sign attack on a linear model reaches the ball's face
        assert cols[name]["max_perturbation_linf"] == pytest.approx(cols[name]["eps_pixel"], abs=1e-6)
    assert cols["autoattack"]["eps_pixel"] == pytest.approx(8 / 255)
    assert cols["eot"]["status"] == DETERMINISTIC and cols["eot"]["accuracy"] is None
    assert sorted(os.listdir(tmp_path)) == ["eval.energies.npz", "eval.json", "model.pt"]  # atomic: no temporaries


def test_saved_energies_match_recomputation(linear_case, tmp_path):
    model, x, y = linear_case
    out = tmp_path / "eval.json"
    evaluate_stage(_run(_evaluation()), tmp_path, _model_file(tmp_path), out)
    saved = np.load(tmp_path / "eval.energies.npz")
    with torch.no_grad():
        logits = model(x)
        # PGD on CE of a 2-class linear model ends at x - eps*sign(w_y - w_other)
        dw = model.fc.weight[y] - model.fc.weight[1 - y]
        logits_adv = model(x - EPS * dw.sign().view(-1, 1, 4, 4))
    np.testing.assert_array_equal(saved["labels"], y.numpy())
    np.testing.assert_allclose(saved["clean_joint"], -logits[torch.arange(len(y)), y].numpy(), atol=1e-5)
    np.testing.assert_allclose(saved["clean_marginal"], -torch.logsumexp(logits, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(saved["pgd_joint"], -logits_adv[torch.arange(len(y)), y].numpy(), atol=1e-4)
    np.testing.assert_allclose(saved["pgd_marginal"], -torch.logsumexp(logits_adv, 1).numpy(), atol=1e-4)
    assert saved["pgd_correct"].mean() == pytest.approx(json.loads(out.read_text())["columns"]["pgd"]["accuracy"])


def test_expected_log_softmax_is_the_mean_cross_entropy_over_draws():
    model, x, y = Linear(num_classes=3), torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    wrapped = ExpectedLogSoftmax(model, 0.1, 7, torch.Generator().manual_seed(3))
    g = wrapped(x)
    draws = torch.Generator().manual_seed(3)
    noise = torch.randn((7, *x.shape), generator=draws)
    ce = torch.stack([nn.functional.cross_entropy(model(x + 0.1 * n), y, reduction="none") for n in noise])
    torch.testing.assert_close(-g[torch.arange(5), y], ce.mean(0))  # -E_s[log p] = joint energy of g


def test_eot_column_present_for_noisy_models(linear_case, tmp_path, monkeypatch):
    model, x, y = linear_case
    monkeypatch.setattr(ev_mod, "load_for_run", lambda run, p, device=None, **kw: (model, {"noise_std": 0.03}))
    result = evaluate_stage(_run(_evaluation(eot={"samples": 3})), tmp_path, _model_file(tmp_path), tmp_path / "e.json")
    eot = result["columns"]["eot"]
    assert eot["status"] == "ok" and eot["n"] == len(y) and eot["samples"] == 3 and eot["noise_std"] == 0.03
    assert 0.0 <= eot["accuracy"] <= eot["clean_accuracy"] <= 1.0
    # a linear model's EOT gradient has the noiseless sign, so EOT-PGD is at least as strong as the worst case allows
    assert eot["accuracy"] <= result["columns"]["clean"]["accuracy"]
    assert "eot_joint" in np.load(tmp_path / "e.energies.npz")
    assert result["test_noise_std"] == 0.03


def test_bad_inputs_fail_before_work(linear_case, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate_stage(_run(_evaluation()), tmp_path, tmp_path / "missing.pt", tmp_path / "e.json")
    with pytest.raises(ValueError, match="n_examples"):
        evaluate_stage(_run(_evaluation(n_examples=10_000)), tmp_path, _model_file(tmp_path), tmp_path / "e.json")
    with pytest.raises(ValueError, match=".json"):
        evaluate_stage(_run(_evaluation()), tmp_path, _model_file(tmp_path), tmp_path / "e.txt")


def test_user_state_dict_checkpoint_evaluates(tmp_path, monkeypatch):
    """A bare state_dict (no robust-ebm metadata, DataParallel prefixes) takes the run's model config."""
    cfg = ModelConfig(arch="tiny_cnn", width=4, norm="none")
    model = build_model(cfg, num_classes=10, in_channels=1, image_size=8)
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "theirs.pt")
    x_u8 = torch.randint(0, 256, (12, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        y = model(x_u8.float() / 255).argmax(1)
    monkeypatch.setattr(ev_mod, "load_prepared", lambda d: (_splits(x_u8, y), None))
    monkeypatch.setattr(ev_mod, "run_autoattack", _fake_autoattack)
    dataset = SimpleNamespace(num_classes=10, channels=1, image_size=8)
    evaluation = _evaluation(pgd={"steps": 2}, energy_attack={"steps": 2}, ebjdat_scale={"steps": 2})
    result = evaluate_stage(_run(evaluation, model=cfg, dataset=dataset), tmp_path, tmp_path / "theirs.pt",
                            tmp_path / "e.json")
    assert result["columns"]["clean"]["accuracy"] == 1.0 and result["columns"]["clean"]["n"] == 12


HIST_NAMES = ("pgd_kl", "apgd_ce", "apgd_t", "apgd_dlr", "fab", "square", "cw_l2", "fab_t", "cw_linf")
CHEAP_HIST = {"n_examples": 12, "attacks": list(HIST_NAMES), "eps": 0.3, "step": 0.075, "pgd_steps": 5,
              "apgd_iters": 10, "fab_iters": 10, "square_queries": 100}


def _tiny_case(monkeypatch, classes):
    """A tiny random CNN on 16 1x8x8 test images; three of them mislabelled."""
    model = tiny_classifier(classes=classes).requires_grad_(False)
    x_u8 = torch.randint(0, 256, (16, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        y = model(x_u8.float() / 255).argmax(1)
    y[:3] = (y[:3] + 1) % classes
    monkeypatch.setattr(ev_mod, "load_prepared", lambda d: (_splits(x_u8, y), None))
    monkeypatch.setattr(ev_mod, "load_for_run", lambda run, p, device=None, **kw: (model, {}))
    monkeypatch.setattr(ev_mod, "run_autoattack", _fake_autoattack)
    return model, x_u8.float() / 255, y


def test_histogram_attacks_write_energies_and_diagnostic_entries(tmp_path, monkeypatch):
    model, x, y = _tiny_case(monkeypatch, classes=10)
    evaluation = _evaluation(pgd={"steps": 2}, energy_attack={"steps": 2}, ebjdat_scale={"steps": 2},
                             histogram_attacks=CHEAP_HIST)
    result = evaluate_stage(_run(evaluation), tmp_path, _model_file(tmp_path), tmp_path / "e.json")
    saved, stored = np.load(tmp_path / "e.energies.npz"), json.loads((tmp_path / "e.json").read_text())
    assert set(stored["histogram_attacks"]) == set(HIST_NAMES) and not set(HIST_NAMES) & set(stored["columns"])
    clean_correct = saved["clean_correct"][:12]
    broken = 0
    for name in HIST_NAMES:
        entry = stored["histogram_attacks"][name]
        assert set(ENTRY_KEYS) <= set(entry), name
        assert entry["status"] == "diagnostic" and "not the headline" in entry["protocol"], name
        assert "REDUCED" in entry["protocol"] and entry["n"] == 12 and entry["eps_pixel"] == pytest.approx(0.3)
        for kind in ("marginal", "joint", "correct"):
            assert saved[f"{name}_{kind}"].shape == (12,), (name, kind)
        correct = saved[f"{name}_correct"]
        assert entry["accuracy"] == pytest.approx(correct.mean())
        assert entry["clean_accuracy"] == pytest.approx(clean_correct.mean()) == pytest.approx(9 / 12)
        assert not (correct & ~clean_correct).any() and entry["accuracy"] <= entry["clean_accuracy"]
        assert entry["max_perturbation_linf"] <= 0.3 + 1e-5 or name == "cw_l2"  # CW-L2 has no L-inf budget
        assert 0 <= entry["fraction_perturbed"] <= 1
        broken += int((clean_correct & ~correct).sum())
        # unattacked (misclassified) points keep exactly their clean energies
        np.testing.assert_allclose(saved[f"{name}_joint"][~clean_correct], saved["clean_joint"][:12][~clean_correct])
    assert broken > 0, "the case must let at least one attack break a point"
    assert "PGD on the Carlini-Wagner margin" in stored["histogram_attacks"]["cw_linf"]["protocol"]
    assert result["histogram_attacks"]["apgd_t"]["objective"] == "dlr-targeted"


def test_histogram_attacks_skip_what_the_model_cannot_run_and_stay_off_by_default(tmp_path, monkeypatch):
    _tiny_case(monkeypatch, classes=3)
    evaluation = _evaluation(pgd={"steps": 1}, energy_attack={"steps": 1}, ebjdat_scale={"steps": 1},
                             histogram_attacks={**CHEAP_HIST, "attacks": ["apgd_t", "apgd_dlr"]})
    result = evaluate_stage(_run(evaluation), tmp_path, _model_file(tmp_path), tmp_path / "e.json")
    entries, saved = result["histogram_attacks"], np.load(tmp_path / "e.energies.npz")
    assert entries["apgd_t"]["status"].startswith("skipped: ") and "4 classes" in entries["apgd_t"]["status"]
    assert entries["apgd_t"]["accuracy"] is None and "apgd_t_joint" not in saved
    assert entries["apgd_dlr"]["status"] == "diagnostic" and "apgd_dlr_joint" in saved
    off = _evaluation(pgd={"steps": 1}, energy_attack={"steps": 1}, ebjdat_scale={"steps": 1})
    assert off.histogram_attacks is None
    assert "histogram_attacks" not in evaluate_stage(_run(off), tmp_path, _model_file(tmp_path), tmp_path / "f.json")


@pytest.mark.slow
def test_official_autoattack_column_is_bounded_by_the_analytic_worst_case(tmp_path, monkeypatch):
    """Real AutoAttack on a 10-class linear model: it cannot beat the exact robust accuracy
    (all j: m_j > eps * ||w_y - w_j||_1), and cannot be weaker than the clean accuracy."""
    model = Linear(num_classes=10, seed=2)
    x_u8 = torch.randint(77, 178, (16, 1, 4, 4), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    x = x_u8.float() / 255
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    w = model.fc.weight.detach()
    margins = logits[torch.arange(16), y].view(-1, 1) - logits - EPS * (w[y].unsqueeze(1) - w.unsqueeze(0)).abs().sum(2)
    margins[torch.arange(16), y] = float("inf")
    analytic = (margins.min(1).values > 0).float().mean().item()
    monkeypatch.setattr(ev_mod, "load_prepared", lambda d: (_splits(x_u8, y), None))
    monkeypatch.setattr(ev_mod, "load_for_run", lambda run, p, device=None, **kw: (model, {}))
    evaluation = _evaluation(autoattack={"n_examples": 16, "batch_size": 16})
    aa = evaluate_stage(_run(evaluation), tmp_path, _model_file(tmp_path), tmp_path / "e.json")["columns"]["autoattack"]
    assert aa["n"] == 16 and aa["eps_pixel"] == pytest.approx(8 / 255)
    assert analytic - 1e-6 <= aa["accuracy"] <= 1.0


def test_ebjdat_scale_attacks_the_noisy_test_images(linear_case, tmp_path, monkeypatch):
    """EB-JDAT's eval adds the model's test-time noise before its PGD (test_noise 'model'); 'none' keeps x."""
    model, x, y = linear_case
    monkeypatch.setattr(ev_mod, "load_for_run", lambda run, p, device=None, **kw: (model, {"noise_std": 0.03}))
    col = evaluate_stage(_run(_evaluation()), tmp_path, _model_file(tmp_path), tmp_path / "e.json")["columns"]["ebjdat_scale"]
    g = torch.Generator().manual_seed(0 + 3001)  # the column's noise stream (seed + 3001), one draw per batch of 32
    centres = torch.cat([(xb + 0.03 * torch.randn(xb.shape, generator=g)).clamp(0, 1) for xb in x.split(32)])
    noisy, clean = [(_robust_margin(model, c, y, EPS / 2) > 0).float().mean().item() for c in (centres, x)]
    assert noisy != clean, "the noise must change the answer, or this test proves nothing"
    assert col["accuracy"] == pytest.approx(noisy)
    assert col["test_noise"] == "model" and col["test_noise_std"] == 0.03 and "N(0, 0.03^2)" in col["protocol"]
    assert col["max_perturbation_linf"] == pytest.approx(EPS / 2, abs=1e-6)  # measured around the noisy centre
    off = evaluate_stage(_run(_evaluation(ebjdat_scale={"test_noise": "none"})), tmp_path, _model_file(tmp_path),
                         tmp_path / "f.json")["columns"]["ebjdat_scale"]
    assert off["accuracy"] == pytest.approx(clean) and off["test_noise_std"] == 0.0
