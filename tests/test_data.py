"""Data sets, splits, loaders and class statistics."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
import yaml
from PIL import Image

from robust_ebm.config import DatasetConfig, params_from_dict
from robust_ebm.data import (
    JPEG_CIFAR_NOTE, DataUnavailableError, TensorSplit, class_stats, load_prepared, load_splits, make_loader,
    random_crop, read_image_folder, split_train_valid, training_split, weat_pca_rank,
)
from robust_ebm.prepare import prepare_stage

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def digits_cfg(params):
    return params.profile_config("smoke").dataset("digits")


@pytest.fixture(scope="module")
def digits(digits_cfg):
    return load_splits(digits_cfg)


def write_image_folder(root, classes, per_class, size, channels=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size, channels), generator=gen, dtype=torch.uint8)
            Image.fromarray(pixels.squeeze(-1).numpy()).save(root / name / f"{i:04d}.png")


# ---------------------------------------------------------------- splits


def test_digits_splits(digits, digits_cfg):
    assert (len(digits.train), len(digits.valid), len(digits.test)) == (1797 - 360 - 200, 200, 360)
    assert digits.train.images.shape[1:] == (1, 8, 8) and digits.train.images.dtype == torch.uint8
    assert int(digits.train.images.max()) == 255                      # 16 -> 255
    counts = torch.bincount(digits.test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37                  # stratified test split
    again = load_splits(digits_cfg)
    assert torch.equal(again.valid.images, digits.valid.images)       # deterministic
    other = load_splits(digits_cfg, seed=1)
    assert torch.equal(other.test.images, digits.test.images)         # the test split never moves
    assert not torch.equal(other.valid.labels, digits.valid.labels)


def test_train_valid_split_is_disjoint_and_complete():
    ids = torch.arange(100)
    split = TensorSplit(torch.zeros(100, 1, 8, 8, dtype=torch.uint8), ids)
    train, valid = split_train_valid(split, 20, seed=0)
    assert len(valid) == 20 and len(train) == 80
    assert set(train.labels.tolist()).isdisjoint(valid.labels.tolist())
    assert sorted(train.labels.tolist() + valid.labels.tolist()) == ids.tolist()
    small, valid2 = split_train_valid(split, 20, seed=0, n_train=10)
    assert torch.equal(valid2.labels, valid.labels) and len(small) == 10
    assert set(small.labels.tolist()) <= set(train.labels.tolist())
    with pytest.raises(ValueError, match="n_valid"):
        split_train_valid(split, 100, seed=0)


def test_first_validation_images_are_a_uniform_draw_from_class_sorted_data():
    labels = torch.arange(10).repeat_interleave(100)  # class by class, as ImageFolder reads them
    split = TensorSplit(torch.zeros(1000, 1, 2, 2, dtype=torch.uint8), labels)
    _, valid = split_train_valid(split, 200, seed=0)
    assert len(set(valid.labels[:50].tolist())) == 10  # model selection reads the first n


def test_image_folder_source_resizes(tmp_path):
    write_image_folder(tmp_path / "train", ["b", "a"], 5, size=10)
    write_image_folder(tmp_path / "val", ["b", "a"], 2, size=10)
    cfg = DatasetConfig(source="imagefolder", root=str(tmp_path), num_classes=2, channels=3, image_size=8, n_valid=2)
    splits = load_splits(cfg)
    assert splits.classes == ["a", "b"]
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (8, 2, 4)
    assert splits.test.images.shape == (4, 3, 8, 8)
    assert splits.source.startswith("imagefolder")


def test_image_folder_test_split_is_mixed_so_first_n_covers_every_class(tmp_path):
    """Folder order is class by class; evaluation takes the first n test images."""
    classes = [f"c{k}" for k in range(5)]
    write_image_folder(tmp_path / "train", classes, 4, size=8)
    write_image_folder(tmp_path / "test", classes, 20, size=8)
    cfg = DatasetConfig(source="imagefolder", root=str(tmp_path), num_classes=5, channels=3, image_size=8, n_valid=2)
    first, again = load_splits(cfg).test, load_splits(cfg).test
    assert torch.equal(first.labels, again.labels) and torch.equal(first.images, again.images)  # fixed order
    assert len(set(first.labels[:20].tolist())) == 5  # 20 images in folder order would be one class
    assert sorted(first.labels.tolist()) == sorted(k for k in range(5) for _ in range(20))


def test_missing_cifar_without_download_names_the_paths(tmp_path):
    root = tmp_path / "nowhere" / "cifar10"
    cfg = DatasetConfig(source="torchvision", name="CIFAR10", root=str(root), num_classes=10, channels=3,
                        image_size=32, n_valid=10, download=False)
    with pytest.raises(DataUnavailableError) as info:
        load_splits(cfg)
    msg = str(info.value)
    assert "CIFAR10" in msg and str(root) in msg and "cifar-10-batches-py" in msg
    assert "ImageFolder" in msg and "ROBUST_EBM_DATA_ROOT" in msg and "download" in msg


def test_missing_imagefolder_names_the_path(tmp_path):
    cfg = DatasetConfig(source="imagefolder", root=str(tmp_path / "tiny"), num_classes=200, channels=3,
                        image_size=64, n_valid=10)
    with pytest.raises(DataUnavailableError, match=str(tmp_path / "tiny")):
        load_splits(cfg)


def test_class_count_mismatch(tmp_path):
    write_image_folder(tmp_path / "train", ["a", "b", "c"], 2, size=8)
    write_image_folder(tmp_path / "test", ["a", "b", "c"], 1, size=8)
    cfg = DatasetConfig(source="imagefolder", root=str(tmp_path), num_classes=2, channels=3, image_size=8, n_valid=1)
    with pytest.raises(ValueError, match="3 classes but num_classes is 2"):
        load_splits(cfg)


# ---------------------------------------------------------------- loaders


def test_loader_shapes_range_and_epoch_coverage(tiny_splits):
    loader = make_loader(tiny_splits.train, 10, augment="crop_flip", generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    xs = torch.cat([x for x, _ in batches])
    assert xs.shape == (48, 3, 8, 8) and xs.dtype == torch.float32
    assert xs.min() >= 0 and xs.max() <= 1
    seen = torch.cat([y for _, y in batches])
    assert torch.equal(seen.sort().values, tiny_splits.train.labels.sort().values)
    assert len(make_loader(tiny_splits.train, 10, drop_last=True)) == 4


def test_loader_is_deterministic_under_a_seeded_generator(tiny_splits):
    def run(seed):
        loader = make_loader(tiny_splits.train, 16, augment="crop_flip", noise_std=0.1,
                             generator=torch.Generator().manual_seed(seed))
        return torch.cat([x for x, _ in loader])

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_noise_is_gaussian_and_not_clamped(tiny_splits):
    loader = make_loader(tiny_splits.train, 48, noise_std=0.5, shuffle=False, generator=torch.Generator().manual_seed(0))
    x, _ = next(iter(loader))
    noise = x - tiny_splits.train.float01()
    assert x.min() < 0 and x.max() > 1
    assert noise.std().item() == pytest.approx(0.5, rel=0.05) and abs(noise.mean().item()) < 0.02


def test_crop_and_flip_are_true_crops_of_the_padded_image():
    x = torch.rand(6, 2, 8, 8)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    out = random_crop(x, 4, torch.Generator().manual_seed(0))
    for b in range(6):
        crops = [padded[b, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[b], c) for c in crops)
    loader = make_loader(TensorSplit((x * 255).to(torch.uint8), torch.zeros(6)), 6, augment="flip", shuffle=False,
                         generator=torch.Generator().manual_seed(1))
    flipped, _ = next(iter(loader))
    ref = (x * 255).to(torch.uint8).float() / 255
    assert all(torch.equal(flipped[b], ref[b]) or torch.equal(flipped[b], ref[b].flip(2)) for b in range(6))


def test_zero_padded_crop_is_torchvisions_random_crop():
    """crop_padding 'zeros' = transforms.RandomCrop(32, padding=4) (TRADES/MART/MAIL/WEAT): the border is 0."""
    x = torch.rand(64, 3, 8, 8) + 0.5
    out = random_crop(x, 4, torch.Generator().manual_seed(0), padding="zeros")
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for b in range(64):
        crops = [padded[b, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[b], c) for c in crops)
    assert (out == 0).any() and not (random_crop(x, 4, torch.Generator().manual_seed(0)) == 0).any()
    with pytest.raises(ValueError, match="crop_padding must be one of"):
        make_loader(TensorSplit(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2)), 2, crop_padding="edge")


def test_training_split_with_and_without_holdout(tiny_splits):
    assert training_split(tiny_splits, holdout=True) is tiny_splits.train
    full = training_split(tiny_splits, holdout=False)
    assert len(full) == len(tiny_splits.train) + len(tiny_splits.valid)
    assert torch.equal(full.images[len(tiny_splits.train):], tiny_splits.valid.images)


# ---------------------------------------------------------------- class statistics


def gaussian_classes(n_per_class, d, num_classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for k in range(num_classes):
        mix = torch.randn(d, d, generator=gen) * (0.1 / (k + 1))
        xs.append(0.5 + k * 0.1 + torch.randn(n_per_class, d, generator=gen) @ mix)
        ys.append(torch.full((n_per_class,), k))
    return torch.cat(xs).reshape(-1, 1, 1, d), torch.cat(ys)


@pytest.mark.parametrize("n_per_class,d", [(400, 6), (8, 20)])   # covariance branch and Gram branch
def test_class_stats_reproduce_mean_and_covariance(n_per_class, d):
    x, y = gaussian_classes(n_per_class, d)
    stats = class_stats(x, y, 3, max_rank=d)
    assert stats.rank == min(d, n_per_class - 1)
    for k in range(3):
        xk = x[y == k].reshape(n_per_class, d).double()
        cov = torch.cov(xk.T)
        basis, scales = stats.basis[k].double(), stats.scales[k].double()
        assert torch.allclose(stats.mean[k].reshape(-1).double(), xk.mean(0), atol=1e-6)
        assert torch.allclose(basis @ torch.diag(scales**2) @ basis.T, cov, atol=1e-5 * cov.abs().max().item())
        assert torch.allclose(basis.T @ basis, torch.eye(stats.rank, dtype=torch.float64), atol=1e-5)
        assert (scales[:-1] >= scales[1:]).all()
        assert stats.total_variance[k].item() == pytest.approx(cov.trace().item(), rel=1e-5)
    assert stats.counts.tolist() == [n_per_class] * 3 and stats.diag_eps == 2.5e-5  # 1e-4 in [-1,1] units (JEM++)


def test_low_rank_stats_keep_the_top_directions():
    x, y = gaussian_classes(300, 10)
    full, low = class_stats(x, y, 3, max_rank=10), class_stats(x, y, 3, max_rank=3)
    assert low.rank == 3
    for k in range(3):
        eig = torch.linalg.eigvalsh(torch.cov(x[y == k].reshape(-1, 10).T.double())).flip(0)
        assert torch.allclose(low.scales[k].double() ** 2, eig[:3], rtol=1e-4)
        share = eig.cumsum(0) / eig.sum()
        for fraction in (0.5, 0.9, 0.99):  # WEAT keeps the leading components whose share is still below it
            assert weat_pca_rank(full, k, fraction) == int((share < fraction).sum())
        if share[2] < 0.99:
            with pytest.raises(ValueError, match="stats_rank"):
                weat_pca_rank(low, k, 0.99)


def test_class_stats_need_an_image_per_class():
    single = class_stats(torch.rand(3, 1, 2, 2), torch.tensor([0, 0, 1]), 2, max_rank=4)
    assert single.rank == 1 and single.scales[1].abs().sum() == 0   # one image: its mean, no spread
    with pytest.raises(ValueError, match="no training images"):
        class_stats(torch.rand(3, 1, 2, 2), torch.tensor([0, 0, 0]), 2, max_rank=4)


# ---------------------------------------------------------------- the data stage


def test_prepare_stage_round_trip(params, digits, tmp_path):
    summary = prepare_stage(params, "smoke", "digits", tmp_path)
    on_disk = json.loads((tmp_path / "data.json").read_text())
    assert on_disk == summary
    assert summary["counts"] == {"train": len(digits.train), "valid": len(digits.valid), "test": len(digits.test)}
    assert summary["splits_sha256"] == hashlib.sha256((tmp_path / "splits.pt").read_bytes()).hexdigest()
    assert "note" not in summary
    splits, stats = load_prepared(tmp_path)
    for name in ("train", "valid", "test"):
        assert torch.equal(getattr(splits, name).images, getattr(digits, name).images)
        assert torch.equal(getattr(splits, name).labels, getattr(digits, name).labels)
    assert splits.classes == digits.classes and splits.source == "sklearn_digits"
    ref = class_stats(digits.train.float01(), digits.train.labels, 10, 64)
    assert torch.allclose(stats.mean, ref.mean) and torch.allclose(stats.scales, ref.scales)


def test_prepare_stage_labels_the_jpeg_cifar_copy(repo_root, tmp_path, monkeypatch):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["datasets"]["cifar10"].update(n_valid=2, stats_rank=4, download=False)
    write_image_folder(tmp_path / "data" / "cifar10" / "train", CIFAR10_CLASSES, 3, size=32)
    write_image_folder(tmp_path / "data" / "cifar10" / "test", CIFAR10_CLASSES, 1, size=32)
    monkeypatch.setenv("ROBUST_EBM_DATA_ROOT", str(tmp_path / "data"))
    summary = prepare_stage(params_from_dict(raw), "paper", "cifar10", tmp_path / "out")
    assert summary["note"] == JPEG_CIFAR_NOTE and summary["source"].startswith("imagefolder")
    assert summary["counts"] == {"train": 28, "valid": 2, "test": 10}


def test_load_prepared_names_the_missing_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="data stage"):
        load_prepared(tmp_path)


# ---------------------------------------------------------------- real CIFAR-10 (JPEG copy)


def test_real_cifar10_test_subset(cifar10_root):
    split, classes = read_image_folder(cifar10_root / "test", max_per_class=20)
    assert classes == CIFAR10_CLASSES
    assert split.images.shape == (200, 3, 32, 32) and split.images.dtype == torch.uint8
    assert torch.bincount(split.labels).tolist() == [20] * 10
    channel_mean = split.float01().mean((0, 2, 3))
    assert torch.allclose(channel_mean, torch.tensor([0.49, 0.48, 0.45]), atol=0.06)  # CIFAR-10's known RGB means


@pytest.mark.slow
def test_real_cifar10_full_splits(cifar10_root):
    cfg = DatasetConfig(source="torchvision", name="CIFAR10", root=str(cifar10_root), num_classes=10, channels=3,
                        image_size=32, n_valid=5000)
    splits = load_splits(cfg)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (45000, 5000, 10000)
    assert splits.classes == CIFAR10_CLASSES and splits.source.startswith("imagefolder")
