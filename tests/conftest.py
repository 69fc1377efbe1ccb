"""Shared fixtures: the repository's params, tiny synthetic splits, and real CIFAR-10 when its archive exists."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from robust_ebm.config import load_params
from robust_ebm.data import Splits, TensorSplit

REPO = Path(__file__).resolve().parents[1]
# The project's shared folder sits beside the checkout (../shared); it is optional.
DEFAULT_CIFAR10_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR10_ARCHIVE_ENV = "ROBUST_EBM_CIFAR10_ARCHIVE"


# Unit tests use tiny tensors, for which one intra-op thread is fastest and avoids
# oversubscribing CI's two cores (10x slower AutoAttack otherwise).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def params():
    """The repository's params.yaml, validated."""
    return load_params(REPO / "params.yaml")


def make_tiny_splits(n_train=48, n_valid=16, n_test=24, num_classes=4, channels=3, size=8, seed=0) -> Splits:
    """Random uint8 images whose class shifts the mean brightness (so a tiny net can learn something)."""
    gen = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.arange(n) % num_classes
        base = torch.randint(0, 128, (n, channels, size, size), generator=gen)
        images = (base + labels[:, None, None, None] * (127 // max(num_classes - 1, 1))).to(torch.uint8)
        return TensorSplit(images, labels)

    return Splits(train=split(n_train), valid=split(n_valid), test=split(n_test),
                  classes=[f"c{k}" for k in range(num_classes)], source="synthetic")


@pytest.fixture
def tiny_splits() -> Splits:
    """Small synthetic Splits: 4 classes of 3x8x8 uint8 images (48 train, 16 valid, 24 test)."""
    return make_tiny_splits()


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """The real CIFAR-10 JPEG copy in ImageFolder layout, unpacked once into .cache/data/cifar10.

    Archive path: env ROBUST_EBM_CIFAR10_ARCHIVE, else /work/shared/data/cifar10-jpeg.tar.gz.
    Skips (with the reason) only when the archive is absent.
    """
    archive = Path(os.environ.get(CIFAR10_ARCHIVE_ENV) or DEFAULT_CIFAR10_ARCHIVE)
    if not archive.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {archive} (set {CIFAR10_ARCHIVE_ENV}): tests on real data need it")
    cache = REPO / ".cache" / "data"
    root = cache / "cifar10"
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".cifar10.lock")):   # parallel test workers unpack once
        done = root / ".unpacked"
        if not done.exists():
            with tarfile.open(archive) as tar:
                tar.extractall(cache, filter="data")
            done.touch()
    return root
