"""IS/FID closed forms, the Inception plumbing (random weights, never reported), refclf metrics,
energy statistics and the metrics stage."""

import json
import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import robust_ebm.metrics.inception as inception
import robust_ebm.metrics.stage as stage
from robust_ebm.config import MetricsConfig, PathsConfig, TrainingConfig
from robust_ebm.energy import joint_energy, marginal_energy
from robust_ebm.metrics import (
    InceptionWeightsUnavailable, compute_energies, energy_report, feature_stats, frechet_distance,
    frechet_distance_to_stats,
    inception_metrics, inception_score_from_probs, mean_gap, metrics_stage, paired_delta, refclf_metrics,
    resolve_inception_weights, summarize,
)
from robust_ebm.models import ModelConfig, save_classifier
from helpers import tiny_classifier


# ---------------------------------------------------------------- Fréchet distance and Inception score

def random_stats(d, seed):
    g = np.random.default_rng(seed)
    m = g.standard_normal((d, d))
    return g.standard_normal(d), m @ m.T / d + 0.1 * np.eye(d)


def test_frechet_matches_pytorch_fid_reference_implementation():
    from pytorch_fid.fid_score import calculate_frechet_distance
    (mu1, s1), (mu2, s2) = random_stats(6, 0), random_stats(6, 1)
    with pytest.warns(DeprecationWarning):  # pytorch-fid passes sqrtm(disp=False), deprecated in SciPy 1.17
        expected = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_closed_form_for_diagonal_gaussians_and_symmetry():
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    # commuting covariances: FID = ||mu1-mu2||^2 + sum (sqrt v1 - sqrt v2)^2
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu2, np.diag(v2), mu1, np.diag(v1)) == pytest.approx(expected, rel=1e-12)


def test_frechet_of_a_set_with_itself_is_zero_even_with_singular_covariance():
    feats = np.random.default_rng(0).standard_normal((5, 40))  # N < D: rank-deficient covariance
    mu, sigma = feature_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)  # sqrt of rounding-level eigenvalues
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


@pytest.mark.parametrize("n", [4, 30])  # N <= D uses the N x N form, N > D the covariance form
def test_frechet_from_features_equals_the_covariance_form(n):
    g = np.random.default_rng(n)
    feats = g.standard_normal((n, 12)) * 2 + 1
    mu, sigma = random_stats(12, 5)
    assert frechet_distance_to_stats(feats, mu, sigma) == pytest.approx(
        frechet_distance(*feature_stats(feats), mu, sigma), rel=1e-8)


def test_feature_stats_are_mean_and_unbiased_covariance():
    feats = torch.randn(50, 4, dtype=torch.float64)
    mu, sigma = feature_stats(feats)
    np.testing.assert_allclose(mu, feats.mean(0).numpy())
    np.testing.assert_allclose(sigma, torch.cov(feats.T).numpy())
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(torch.randn(1, 4))


def test_inception_score_extremes_and_torch_fidelity_agreement():
    k = 7
    assert inception_score_from_probs(torch.full((70, k), 1 / k), splits=5)[0] == pytest.approx(1.0)
    one_hot = torch.eye(k).repeat(10, 1)
    assert inception_score_from_probs(one_hot, splits=1)[0] == pytest.approx(k)
    from torch_fidelity.metric_isc import isc_features_to_metric
    logits = torch.randn(64, 5, dtype=torch.float64) * 3
    ours = inception_score_from_probs(torch.softmax(logits, 1), splits=1)[0]
    theirs = isc_features_to_metric(logits, splits=1)["inception_score_mean"]
    assert ours == pytest.approx(theirs, rel=1e-10)


def test_inception_score_shuffles_class_sorted_sets_before_splitting():
    k = 10
    sorted_by_class = torch.eye(k).repeat_interleave(100, dim=0)  # split i would hold only class i
    mean, std = inception_score_from_probs(sorted_by_class, splits=10)
    assert mean > 0.8 * k and std >= 0
    with pytest.raises(ValueError, match="probabilities"):
        inception_score_from_probs(torch.randn(20, 3), splits=2)


# ---------------------------------------------------------------- Inception weights and plumbing

@pytest.fixture(autouse=True)
def small_inception_input(monkeypatch):
    """Resize to Inception's minimum 75x75 instead of 299x299 (16x fewer FLOPs): the tests check plumbing,
    and the resize stays the library's own."""
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory):
    """A random-init state dict of torch-fidelity's Inception class: plumbing only, never a reported number.
    Kaiming-normal convolutions keep activations O(1) so that distances are not vacuously tiny."""
    cls = inception.FeatureExtractorInceptionV3
    mp = pytest.MonkeyPatch()
    mp.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(cls, "load_state_dict", lambda self, state, *a, **k: None)
    torch.manual_seed(0)
    net = cls("inception-v3-compat", ["2048"])
    mp.undo()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache, no env var, and a download that fails as it does offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)

    def no_network(url, dst):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(inception, "_download", no_network)
    return tmp_path / "torch_home" / "hub" / "checkpoints" / inception.WEIGHTS_FILE


def test_missing_weights_raise_with_every_hint(offline):
    with pytest.raises(InceptionWeightsUnavailable) as err:
        resolve_inception_weights(None)
    msg = str(err.value)
    for hint in (inception.WEIGHTS_FILE, inception.WEIGHTS_URL, "paths.inception_weights",
                 inception.WEIGHTS_ENV, str(offline), "URLError"):
        assert hint in msg


def test_weights_resolution_order(offline, tmp_path, monkeypatch, fake_weights):
    with pytest.raises(inception.InceptionWeightsNotFound, match="does not exist"):
        resolve_inception_weights(tmp_path / "nope.pth")  # an explicit path is never silently replaced: an error
    assert resolve_inception_weights(fake_weights) == fake_weights
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(fake_weights))
    assert resolve_inception_weights(None) == fake_weights
    monkeypatch.delenv(inception.WEIGHTS_ENV)
    monkeypatch.setattr(inception, "_download", lambda url, dst: (dst.parent.mkdir(parents=True), dst.write_bytes(b"w")))
    assert resolve_inception_weights(None) == offline  # downloaded into the hub cache
    assert resolve_inception_weights(None, download=False) == offline  # and found there next time


def test_wrong_weights_file_is_reported(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(InceptionWeightsUnavailable, match="not a torch-fidelity InceptionV3"):
        inception.load_inception(bad)


def test_inception_pipeline_runs_and_fid_of_a_set_with_itself_is_zero(fake_weights, tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g)
    other = torch.randint(0, 128, (6, 3, 16, 16), dtype=torch.uint8, generator=g)
    net = inception.load_inception(fake_weights)
    same = inception_metrics(images, images, weights=fake_weights, net=net, splits=2, cache_dir=tmp_path)
    diff = inception_metrics(images, other, weights=fake_weights, net=net, splits=2)
    assert set(same) == {"is", "is_std", "fid", "n", "n_ref", "protocol"} and same["n"] == same["n_ref"] == 6
    assert diff["fid"] > 0 and abs(same["fid"]) < 1e-6 * diff["fid"]
    assert 1.0 <= same["is"] <= 1008
    # grey images are repeated to RGB: the same numbers as their 3-channel copy
    grey = images[:, :1]
    assert inception_metrics(grey, grey.repeat(1, 3, 1, 1), weights=fake_weights, net=net, splits=2)["fid"] \
        == pytest.approx(0.0, abs=1e-6 * diff["fid"])
    with pytest.raises(ValueError, match="uint8"):
        inception.to_inception_input(images.float() / 255)


def test_reference_stats_are_cached_per_data_set(fake_weights, tmp_path, monkeypatch):
    net = inception.load_inception(fake_weights)
    ref = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    first = inception.reference_stats(net, ref, weights=fake_weights, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("inception_ref_*.pt"))) == 1
    monkeypatch.setattr(inception, "inception_outputs", lambda *a, **k: pytest.fail("cache not used"))
    again = inception.reference_stats(net, ref, weights=fake_weights, cache_dir=tmp_path)
    np.testing.assert_allclose(again.mu, first.mu) and np.testing.assert_allclose(again.sigma, first.sigma)
    assert again.key == first.key and again.n == 4
    assert inception._reference_key(ref.flip(0), fake_weights) != first.key  # other data, other file


# ---------------------------------------------------------------- reference classifier

def test_refclf_metrics_names_and_values():
    model = tiny_classifier()
    images = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 3, (30,))
    res = refclf_metrics(model, images, labels, images, splits=3)
    assert {"fid_refclf", "is_refclf", "class_consistency_refclf", "n", "n_ref"} <= set(res)
    assert abs(res["fid_refclf"]) < 1e-8 and 1.0 <= res["is_refclf"] <= 3.0
    with torch.no_grad():
        accuracy = (model(images.float() / 255).argmax(1) == labels).double().mean().item()
    assert res["class_consistency_refclf"] == pytest.approx(accuracy)
    shifted = refclf_metrics(model, images // 4, labels, images, splits=3)
    assert shifted["fid_refclf"] > 0


# ---------------------------------------------------------------- energy statistics

def test_compute_energies_uses_the_shared_energy_definitions():
    model = tiny_classifier().train()
    x, y = torch.randint(0, 256, (7, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 3, (7,))
    out = compute_energies(model, x, y, batch_size=3)
    assert model.training  # mode restored
    with torch.no_grad():
        logits = model.eval()(x.float() / 255)
    torch.testing.assert_close(out["E_x"], marginal_energy(logits))
    torch.testing.assert_close(out["E_xy"], joint_energy(logits, y))


def test_summary_gap_and_paired_delta():
    e = torch.arange(101, dtype=torch.float64)
    s = summarize(e)
    assert s["mean"] == 50 and s["median"] == 50 and s["q05"] == 5 and s["q95"] == 95 and s["n"] == 101
    assert s["std"] == pytest.approx(np.std(e.numpy(), ddof=1))
    assert mean_gap(torch.zeros(4), torch.full((9,), 2.0)) == 2.0  # unpaired sets allowed
    d = paired_delta(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 1.0]))  # ΔE = E(x) - E(x*)
    assert d["mean"] == pytest.approx(1.0) and d["n"] == 3
    with pytest.raises(ValueError, match="paired"):
        paired_delta(torch.zeros(3), torch.zeros(2))


def test_energy_report_gaps_and_prefix_pairing():
    clean = {"E_x": torch.tensor([1.0, 2.0, 3.0, 4.0]), "E_xy": torch.tensor([2.0, 3.0, 4.0, 5.0])}
    pgd = {"E_x": torch.tensor([0.0, 1.0, 2.0, 3.0]), "E_xy": torch.tensor([12.0, 13.0, 14.0, 15.0])}
    aa = {"E_x": torch.tensor([0.5, 0.5]), "E_xy": torch.tensor([9.0, 9.0])}  # first two images only
    gen = {"E_x": torch.tensor([5.0]), "E_xy": torch.tensor([7.5])}
    rep = energy_report({"clean": clean, "pgd": pgd, "autoattack": aa, "generated/sgld": gen},
                        paired=("pgd", "autoattack"))
    assert rep["gap"]["E_xy/clean->pgd"] == pytest.approx(10.0)
    assert rep["gap"]["E_xy/clean->generated/sgld"] == pytest.approx(4.0)
    assert rep["delta"]["E_x/clean-pgd"]["mean"] == pytest.approx(1.0)
    assert rep["delta"]["E_x/clean-autoattack"]["mean"] == pytest.approx(1.0)  # (1-0.5 + 2-0.5) / 2
    assert "E_x/clean-generated/sgld" not in rep["delta"]
    assert rep["summary"]["pgd"]["E_xy"]["mean"] == pytest.approx(13.5)
    with pytest.raises(ValueError, match="reference"):
        energy_report({"pgd": pgd})


# ---------------------------------------------------------------- the stage

@pytest.fixture
def run_files(tmp_path, monkeypatch):
    """A run's files on disk: model, refclf, samples, eval energies; load_prepared returns tiny splits."""
    g = torch.Generator().manual_seed(0)
    split = lambda n: SimpleNamespace(images=torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g),  # noqa: E731
                                      labels=torch.randint(0, 3, (n,), generator=g))
    splits = SimpleNamespace(train=split(8), valid=split(4), test=split(10))
    monkeypatch.setattr(stage, "load_prepared", lambda data_dir: (splits, None))
    cfg = ModelConfig(arch="tiny_cnn", width=4)
    save_classifier(tmp_path / "model.pt", tiny_classifier(0), cfg, {})
    save_classifier(tmp_path / "refclf.pt", tiny_classifier(1), cfg, {})
    samples = tmp_path / "samples"
    samples.mkdir()
    np.savez(samples / "sgld.npz", images=torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8).numpy(),
             labels=np.repeat(np.arange(3), 4).astype(np.int64))
    (samples / "generate.json").write_text(json.dumps({"generators": {
        "sgld": {"files": {"npz": "sgld.npz"}, "count": 12, "status": "ok"},
        "buffer": {"files": {"npz": "buffer.npz"}, "count": 0, "status": "skipped: no replay buffer"}}}))
    eval_json = tmp_path / "eval.json"
    eval_json.write_text("{}")
    e = lambda n, off: torch.arange(n, dtype=torch.float32).numpy() + off  # noqa: E731
    np.savez(tmp_path / "eval.energies.npz", labels=np.zeros(10), clean_marginal=e(10, 0), clean_joint=e(10, 1),
             clean_correct=np.ones(10), pgd_marginal=e(10, -1), pgd_joint=e(10, 5), pgd_correct=np.zeros(10))
    metrics = MetricsConfig.model_validate({"inception": {"n_uniform": 50, "n_small": 6, "splits": 2},
                                            "fisher": {"probes": 2, "n_examples": 5}, "batch_size": 8})
    run = SimpleNamespace(metrics=metrics, paths=PathsConfig(results=str(tmp_path / "results")), seed=0,
                          device="cpu", profile="smoke", run_name="smoke/digits/jeat/s0", dataset_name="digits",
                          dataset=SimpleNamespace(num_classes=3, channels=1, image_size=8), model=cfg,
                          training=TrainingConfig())
    return run, tmp_path


def call_stage(run, d, tracker=None):
    return metrics_stage(run, d / "data", d / "model.pt", d / "samples", d / "refclf.pt", d / "eval.json",
                         d / "out" / "m.json", tracker=tracker)


def test_refclf_reference_stats_computed_once_give_the_same_numbers():
    from robust_ebm.metrics.refclf import refclf_reference_stats
    model = tiny_classifier(0)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(12) % 3
    reference = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8, generator=g)
    direct = refclf_metrics(model, images, labels, reference, splits=2)
    shared = refclf_metrics(model, images, labels, ref_stats=refclf_reference_stats(model, reference), splits=2)
    assert shared == pytest.approx(direct) and shared["n_ref"] == 20
    with pytest.raises(ValueError, match="either"):
        refclf_metrics(model, images, labels, splits=2)


def test_stage_without_inception_weights_writes_refclf_and_the_absence(run_files, offline):
    run, d = run_files
    logged = []
    result = call_stage(run, d, tracker=SimpleNamespace(log_metrics=logged.append, log_artifact=lambda p: None))
    written = json.loads((d / "out" / "m.json").read_text())
    assert written["inception"]["status"] == "unavailable" and inception.WEIGHTS_FILE in written["inception"]["reason"]
    gen = written["generators"]["sgld"]
    assert set(gen) == {"n_samples", "refclf"} and "buffer" not in written["generators"]
    assert not any(k.startswith(("fid", "is")) for k in gen)  # no unlabelled stand-in
    assert {"fid_refclf", "is_refclf", "class_consistency_refclf", "n", "n_ref"} <= set(gen["refclf"])
    assert gen["refclf"]["n"] == 12 and gen["refclf"]["n_ref"] == 8
    assert written["fisher"]["n"] == 5 and written["fisher"]["probes"] == 2
    assert written["energy"]["gap"]["E_xy/clean->pgd"] == pytest.approx(4.0)
    assert written["energy"]["delta"]["E_x/clean-pgd"]["mean"] == pytest.approx(1.0)
    assert "E_xy/clean->generated/sgld" in written["energy"]["gap"]
    with np.load(d / "out" / "m.energies.npz") as f:
        assert set(f.files) == {"sgld_marginal", "sgld_joint", "sgld_labels"} and len(f["sgld_joint"]) == 12
    assert not logged and result["fisher"] == written["fisher"]  # numbers go to MLflow via the caller's log_summary


def test_refclf_that_is_the_scored_model_gives_no_numbers(run_files, offline):
    """The reference classifier's own run: its samples were optimised against the feature net, so no score."""
    run, d = run_files
    result = metrics_stage(run, d / "data", d / "model.pt", d / "samples", d / "model.pt", d / "eval.json",
                           d / "out" / "m.json")
    assert result["generators"]["sgld"]["refclf"] == {"status": stage.SELF_REFERENCED}
    assert "fisher" in result and "E_xy/clean->generated/sgld" in result["energy"]["gap"]  # the rest is scored


def test_stage_with_weights_names_inception_numbers_by_the_samples_used(run_files, offline, fake_weights):
    run, d = run_files
    run.paths = PathsConfig(results=str(d / "results"), inception_weights=str(fake_weights))
    result = call_stage(run, d)
    gen = result["generators"]["sgld"]
    assert result["inception"]["status"] == "ok"
    # 50 requested, 12 available -> named n12; the small protocol (6) is computed too
    assert {"fid_inception_n12", "is_inception_n12", "fid_inception_n6", "is_inception_n6"} <= set(gen)
    assert "12 samples available, 50 requested" in gen["protocols"]["uniform"]["note"]
    assert gen["protocols"]["small"]["note"] == ""
    assert len(list((d / "results" / "smoke" / "cache" / "inception").glob("*.pt"))) == 1


def test_stage_fails_early_on_missing_inputs(run_files):
    run, d = run_files
    (d / "refclf.pt").unlink()
    with pytest.raises(FileNotFoundError, match="reference classifier"):
        call_stage(run, d)
    with pytest.raises(ValueError, match=".json"):
        metrics_stage(run, d, d / "model.pt", d / "samples", None, None, d / "m.txt")


def test_stage_scores_replay_buffers_with_the_papers_top_confident_protocol(run_files, offline, fake_weights):
    run, d = run_files
    run.paths = PathsConfig(results=str(d / "results"), inception_weights=str(fake_weights))
    g = torch.Generator().manual_seed(5)
    logits = torch.eye(3).repeat(20, 1) * 3 + torch.randn(60, 3, generator=g) * 0.1   # 20 predicted per class
    np.savez(d / "samples" / "buffer.npz", images=torch.randint(0, 256, (60, 1, 8, 8), dtype=torch.uint8, generator=g).numpy(),
             labels=logits.argmax(1).numpy().astype(np.int64), logits=logits.numpy())
    index = json.loads((d / "samples" / "generate.json").read_text())
    index["generators"]["buffer"] = {"kind": "buffer", "files": {"npz": "buffer.npz"}, "count": 60, "status": "ok"}
    (d / "samples" / "generate.json").write_text(json.dumps(index))
    result = call_stage(run, d)
    top = result["generators"]["buffer"]["top_confident"]
    from robust_ebm.metrics.buffer_protocol import top_confident
    assert top["n_top10pct"] == len(top_confident(logits, 0.1, 3)) and top["n_top90pct"] == len(top_confident(logits, 0.9, 3))
    assert top["n_top10pct"] == 6 and top["n_top90pct"] == 54 and top["reference_set"] == "train+test"
    assert all(isinstance(top[k], float) for k in ("is_top10pct", "is_std_top10pct", "fid_top90pct"))
    assert "top_confident" not in result["generators"]["sgld"]   # only replay buffers are ranked
    index["generators"]["buffer"]["files"]["npz"] = "sgld.npz"   # an npz without logits: a clear error
    (d / "samples" / "generate.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no logits"):
        call_stage(run, d)


def test_a_bare_state_dict_that_evaluate_accepts_is_scored_like_the_models_own_file(run_files, offline):
    """metrics reads --model as evaluate does (models.load_for_run): a state_dict with DataParallel prefixes and
    no metadata takes the run's architecture and gives the numbers of the same weights in a train-stage file."""
    run, d = run_files
    weights = tiny_classifier(0).state_dict()
    torch.save({"model": {f"module.{k}": v for k, v in weights.items()}}, d / "theirs.pt")
    own = call_stage(run, d)
    theirs = metrics_stage(run, d / "data", d / "theirs.pt", d / "samples", d / "refclf.pt", d / "eval.json",
                           d / "out" / "theirs.json")
    assert theirs["fisher"] == own["fisher"] and theirs["energy"] == own["energy"]
    assert theirs["generators"]["sgld"]["refclf"] == own["generators"]["sgld"]["refclf"]
