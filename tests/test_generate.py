"""Generation stage: every generator's images, labels and counts; Eq.17 descends E(x,y); targeted PGD; resume."""

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import robust_ebm.generate as gen_mod
from robust_ebm import samples_file
from robust_ebm.attacks import AttackConfig
from robust_ebm.config import ConfigError, DatasetConfig, GenerationConfig, GeneratorSpec, RunConfig, load_params
from robust_ebm.data import Splits, TensorSplit, class_stats
from robust_ebm.energy import joint_energy
from robust_ebm.generate import class_labels, generate_stage, init_inputs, langevin_samples, targeted_pgd_samples
from robust_ebm.models import ModelConfig, build_model, load_classifier, save_classifier
from robust_ebm.runtime import atomic_torch_save
from robust_ebm.sampling import SamplerConfig, initialise

K, SHAPE = 3, (1, 8, 8)


def _data(n_per_class=20, seed=0):
    """Three classes: bright top half, bright bottom half, dark image; plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K).repeat_interleave(n_per_class)
    x = torch.full((len(y), *SHAPE), 0.2)
    x[y == 0, :, :4] = 0.8
    x[y == 1, :, 4:] = 0.8
    x = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def trained():
    """A tiny CNN fitted for a few dozen Adam steps: 'trained-ish', enough for E(x,y) to mean something."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="tiny_cnn", width=4, norm="none")
    model = build_model(cfg, num_classes=K, in_channels=1, image_size=8)
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    stats = class_stats(x, y, K, max_rank=64)
    return model, cfg, x, y, stats


def test_eq17_sampling_lowers_the_joint_energy(trained):
    """From U(0,1) noise (high energy; the class Gaussian already starts near the data's low energy),
    x' = x - (eta/2) grad E(x,y) + sqrt(eta) N(0,I) must descend E(x,y) on average."""
    model, _, _, _, stats = trained
    labels = class_labels(K, 20)
    sampler = SamplerConfig(energy="joint", steps=20, step_size=0.01, coupled=True)
    x0 = initialise("uniform", len(labels), shape=SHAPE, generator=torch.Generator().manual_seed(0))
    x, ys = langevin_samples(model, labels, sampler, "uniform", shape=SHAPE, stats=stats, batch_size=60,
                             generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = joint_energy(model(x0), labels).mean(), joint_energy(model(x), labels).mean()
    assert after < before - 0.1
    assert torch.equal(ys, labels) and x.shape == (len(labels), *SHAPE) and 0 <= x.min() and x.max() <= 1


def test_targeted_pgd_raises_the_target_probability(trained):
    model, _, _, _, stats = trained
    labels = class_labels(K, 10).roll(7)  # mix classes inside a batch
    attack = AttackConfig(norm="l2", eps=3.0, step=0.2, steps=10, random_start="none", objective="ce", targeted=True)
    g = torch.Generator().manual_seed(1)
    x0 = initialise("gaussian", len(labels), shape=SHAPE, stats=stats, labels=labels, generator=torch.Generator().manual_seed(1))
    x, ys = targeted_pgd_samples(model, labels, attack, "gaussian", shape=SHAPE, stats=stats, batch_size=16, generator=g)
    with torch.no_grad():
        p0 = model(x0).softmax(1)[torch.arange(len(labels)), labels]
        p1 = model(x).softmax(1)[torch.arange(len(labels)), labels]
    assert torch.equal(ys, labels)
    assert p1.mean() > p0.mean() and (p1 >= p0 - 1e-6).float().mean() > 0.9
    assert (x - x0).flatten(1).norm(dim=1).max() <= 3.0 + 1e-4
    with pytest.raises(ValueError, match="targeted"):
        targeted_pgd_samples(model, labels, attack.model_copy(update={"targeted": False}), "gaussian",
                             shape=SHAPE, stats=stats)


def test_init_inputs_route_each_init_to_its_split():
    train = TensorSplit(torch.zeros((6, *SHAPE), dtype=torch.uint8), torch.arange(6) % K)
    test = TensorSplit(torch.full((3, *SHAPE), 255, dtype=torch.uint8), torch.arange(3))
    splits, sampler = Splits(train, train, test, ["a", "b", "c"]), {"energy": "joint"}
    noisy = init_inputs(GeneratorSpec(kind="sgld", init="noisy_data", sampler=sampler), splits, "stats")
    assert noisy["data"] is test.images and noisy["data_labels"] is test.labels  # WEAT starts from test images
    assert noisy["noise_std"] == pytest.approx(50 * 8 / 255) and noisy["stats"] == "stats"
    assert init_inputs(GeneratorSpec(kind="sgld", init="data", sampler=sampler), splits, None)["data"] is train.images
    assert "data" not in init_inputs(GeneratorSpec(kind="sgld", init="pca", sampler=sampler), splits, None)


def test_noisy_data_generation_keeps_the_class_of_its_test_images(trained):
    """With no Langevin step the samples are the noisy starts: close to test images of their own class."""
    model, _, x, y, _ = trained
    labels = class_labels(K, 30)
    sampler = SamplerConfig(energy="joint", steps=0)
    out, ys = langevin_samples(model, labels, sampler, "noisy_data", shape=SHAPE, batch_size=20, data=x, data_labels=y,
                               noise_std=0.01, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ys, labels) and out.shape == (len(labels), *SHAPE) and 0 <= out.min() and out.max() <= 1
    nearest = torch.cdist(out.flatten(1), x.flatten(1)).argmin(1)
    assert torch.equal(y[nearest], labels)


GENERATORS = {
    "jeat_eq17": {"kind": "sgld", "init": "gaussian",
                  "sampler": {"energy": "joint", "steps": 3, "step_size": 0.01, "coupled": True}},
    "jeat_eq16": {"kind": "sgld", "init": "gaussian",
                  "sampler": {"energy": "ce", "steps": 3, "step_size": 0.01, "coupled": True}},
    "weat_momentum": {"kind": "sgld", "init": "pca", "pca_fraction": 0.9,
                      "sampler": {"energy": "joint", "steps": 3, "step_size": 0.5, "noise_std": 0.0014,
                                  "momentum": 0.5, "update_clip": 1.0}},
    "weat_noisy": {"kind": "sgld", "init": "noisy_data", "noise_std": "8/255",
                   "sampler": {"energy": "joint", "steps": 3, "step_size": 0.5, "noise_std": 0.0014, "momentum": 0.5}},
    "jem_uncond": {"kind": "sgld", "init": "uniform", "sampler": {"energy": "marginal", "steps": 3}},
    "santurkar_l2": {"kind": "targeted_pgd", "init": "gaussian",
                     "attack": {"norm": "l2", "eps": 2.0, "step": 0.5, "steps": 3, "random_start": "none",
                                "objective": "ce", "targeted": True}},
    "jem_buffer": {"kind": "buffer", "init": "buffer", "methods": ["jem"]},
    "other_only": {"kind": "sgld", "init": "uniform", "sampler": {"energy": "marginal", "steps": 1}, "methods": ["x"]},
}


@functools.lru_cache(maxsize=1)
def smoke_run() -> RunConfig:
    """The smoke profile's run from the repository's params.yaml (supplies the sections generate ignores)."""
    return load_params(Path(__file__).resolve().parents[1] / "params.yaml").profile_config("smoke").run("digits", "jem", 0)


@pytest.fixture
def stage(trained, tmp_path, monkeypatch):
    model, cfg, x, y, stats = trained
    split = TensorSplit((x * 255).round().to(torch.uint8), y)
    monkeypatch.setattr(gen_mod, "load_prepared", lambda d: (Splits(split, split, split, ["a", "b", "c"]), stats))
    model_dir = tmp_path / "model"
    save_classifier(model_dir / "model.pt", model, cfg, {"buffer": "replay_buffer.pt"})
    dataset = DatasetConfig(source="imagefolder", num_classes=model.num_classes, channels=model.in_channels,
                            image_size=model.image_size, n_valid=0)
    run = smoke_run().model_copy(update=dict(
        generation=GenerationConfig(n_per_class=4, batch_size=5, generators=GENERATORS), method_name="jem", seed=0,
        device="cpu", model=cfg, dataset_name="synthetic", dataset=dataset))
    return run, model_dir, tmp_path / "samples", x[:7]


def test_each_generator_writes_images_in_range_with_labels_and_count(stage):
    run, model_dir, out, buffer_images = stage
    atomic_torch_save({"images": buffer_images, "labels": None}, model_dir / "replay_buffer.pt")
    report = generate_stage(run, model_dir, model_dir / "model.pt", out)
    assert set(report["generators"]) == set(GENERATORS) - {"other_only"}  # params decide who runs
    for name, record in report["generators"].items():
        assert record["status"] == "ok", name
        saved = np.load(out / f"{name}.npz")
        images, labels = saved["images"], saved["labels"]
        assert images.dtype == np.uint8 and labels.dtype == np.int64, name
        expected = 7 if name == "jem_buffer" else K * 4
        assert images.shape == (expected, *SHAPE) and len(labels) == expected == record["count"], name
        assert ((0 <= labels) & (labels < K)).all(), name
        if name not in ("jem_buffer", "jem_uncond"):  # conditional generators keep their classes
            np.testing.assert_array_equal(labels, class_labels(K, 4).numpy())
        assert (out / f"{name}_grid.png").stat().st_size > 0
    np.testing.assert_array_equal(np.load(out / "jem_buffer.npz")["images"],
                                  (buffer_images * 255).round().to(torch.uint8).numpy())
    model = load_classifier(model_dir / "model.pt")[0].eval()
    with torch.no_grad():  # buffers keep f(x) of their float images: the papers' top-confident IS/FID ranks by it
        np.testing.assert_allclose(np.load(out / "jem_buffer.npz")["logits"], model(buffer_images).numpy(), atol=1e-5)
    assert "logits" not in np.load(out / "jeat_eq17.npz").files
    records = json.loads((out / "generate.json").read_text())["generators"]
    assert records["jeat_eq17"]["sampler"]["coupled"] is True
    produced = samples_file.produced(out, fix="rerun")  # what metrics and figures read: every generator's arrays
    assert set(produced) == set(report["generators"])
    for name, (_, npz) in produced.items():
        assert all(np.array_equal(v, np.load(out / f"{name}.npz")[k]) for k, v in samples_file.read(npz, fix="").items())
    assert records["weat_noisy"]["noise_std"] == pytest.approx(8 / 255) and records["jeat_eq17"]["noise_std"] is None


def test_buffer_generator_on_an_empty_buffer_names_the_method_and_the_fix(stage):
    """A method without samples trains to an empty replay_buffer.pt (train.Trainer.buffer_file): a buffer generator
    on it is refused before any generator runs, naming the method and the fix (a generator of kind sgld)."""
    run, model_dir, out, _ = stage
    atomic_torch_save({"images": torch.zeros((0, *SHAPE)), "labels": None, "method": "jem",
                       "empty": "method 'jem' keeps no replay buffer"}, model_dir / "replay_buffer.pt")
    with pytest.raises(ConfigError, match=r"'jem_buffer'.*method 'jem'.*empty.*kind sgld"):
        generate_stage(run, model_dir, model_dir / "model.pt", out)
    assert not out.exists() or not list(out.glob("*.npz"))  # refused before any generator ran


def test_generate_stage_is_atomic_and_skips_finished_generators(stage, monkeypatch):
    run, model_dir, out, _ = stage  # no replay buffer saved: the buffer generator says why it is empty
    first = generate_stage(run, model_dir, model_dir / "model.pt", out)
    assert first["generators"]["jem_buffer"]["status"].startswith("skipped: no replay buffer")
    names = sorted(os.listdir(out))
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]  # atomic writes left no temporaries
    stamps = {n: (out / n).stat().st_mtime_ns for n in names if n.endswith(".npz")}

    def fail(*args, **kwargs):
        raise AssertionError("a finished generator was run again")

    monkeypatch.setattr(gen_mod, "langevin_samples", fail)
    monkeypatch.setattr(gen_mod, "targeted_pgd_samples", fail)
    second = generate_stage(run, model_dir, model_dir / "model.pt", out)
    assert {n: (out / n).stat().st_mtime_ns for n in stamps} == stamps
    assert second["generators"]["jeat_eq17"]["status"].startswith("ok (found on disk")
    assert second["generators"]["jeat_eq17"]["count"] == K * 4

    (out / "jeat_eq16.npz").write_bytes(b"half a file")  # a damaged output is regenerated
    monkeypatch.setattr(gen_mod, "langevin_samples", langevin_samples)
    third = generate_stage(run, model_dir, model_dir / "model.pt", out)
    assert third["generators"]["jeat_eq16"]["status"] == "ok"
    assert len(np.load(out / "jeat_eq16.npz")["labels"]) == K * 4


def test_samples_of_other_settings_are_not_kept(stage):
    """generate.json's settings key is the generate job's Snakemake trigger (plan.run_settings_digest): a
    data set setting counts, where the data set's files live does not."""
    run, model_dir, out, _ = stage
    generate_stage(run, model_dir, model_dir / "model.pt", out)
    moved = run.model_copy(update={"dataset": run.dataset.model_copy(update={"root": "/elsewhere"})})
    kept = generate_stage(moved, model_dir, model_dir / "model.pt", out)
    assert kept["generators"]["jeat_eq17"]["status"].startswith("ok (found on disk")
    other = run.model_copy(update={"dataset": run.dataset.model_copy(update={"split_seed": 1})})
    again = generate_stage(other, model_dir, model_dir / "model.pt", out)
    assert again["generators"]["jeat_eq17"]["status"] == "ok"
