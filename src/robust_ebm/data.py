"""Data sets, train/valid/test splits, fast tensor loaders and per-class Gaussian statistics.

Images are kept as uint8 NCHW tensors in memory and become float [0,1]
batches in the loader, where augmentation runs vectorised on the batch
(no per-image PIL). Sources:

- `sklearn_digits`: scikit-learn's 8x8 digits (offline; values 0..16 -> 0..255),
  a fixed stratified test split of `n_test` images.
- `torchvision`: CIFAR10 / CIFAR100 / SVHN. Looked up in this order under
  `root`: an ImageFolder layout (train/<class>/*, test/<class>/*), the
  torchvision files, a torchvision download (if `download`). Otherwise
  `DataUnavailableError` says what was tried and how to provide the data.
- `imagefolder`: root/train/<class>/* and root/test/<class>/* (or val/),
  resized to `image_size`.

The validation split is drawn from train by `split_seed`; the test split is
never used for selection. `save_prepared` and `load_prepared` write and read the `data` stage's files
(the stage itself: robust_ebm.prepare).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor
from tqdm.auto import tqdm

from .files import BadFileError, load_torch
from .runtime import atomic_torch_save
from .schema_types import Fraction, Strict

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
JPEG_CIFAR_NOTE = "JPEG q75 ImageFolder copy: close to, not equal to, official CIFAR-10"


class DataUnavailableError(RuntimeError):
    """A data set is neither on disk nor downloadable; the message says how to provide it."""


# --------------------------------------------------------------------------- settings (datasets.<d>, methods.<m>.data)


class DatasetConfig(Strict):
    """One data set. `root` defaults to <paths.data_root>/<key> (resolved by `ProfileConfig.dataset`)."""

    source: Literal["sklearn_digits", "torchvision", "imagefolder"]
    name: Literal["CIFAR10", "CIFAR100", "SVHN"] | None = Field(None, description="torchvision class (source torchvision)")
    root: str | None = None
    num_classes: int = Field(ge=2)
    channels: Literal[1, 3]
    image_size: int = Field(ge=8)
    n_valid: int = Field(ge=0, description="held out from train by split_seed; used for model selection")
    n_train: int | None = Field(None, ge=1, description="keep only this many training images (mini profile); null: all")
    split_seed: int = Field(0, ge=0, description="seed of the train/valid split (one split per data set)")
    download: bool = Field(False, description="try torchvision's download when nothing local is found")
    n_test: int | None = Field(None, ge=1, description="sklearn_digits: size of its stratified test split")
    stats_rank: int = Field(64, ge=1, description="principal directions kept per class (WEAT PCA init; data.class_stats)")

    @model_validator(mode="after")
    def _check_source(self):
        if self.source == "torchvision" and self.name is None:
            raise ValueError("source 'torchvision' needs name: one of CIFAR10, CIFAR100, SVHN")
        if self.source != "torchvision" and self.name is not None:
            raise ValueError(f"name is only used with source 'torchvision'; remove it for source '{self.source}'")
        if self.source == "sklearn_digits":
            if (self.channels, self.image_size, self.num_classes) != (1, 8, 10):
                raise ValueError("sklearn digits are 8x8 grayscale with 10 classes: set channels 1, image_size 8, num_classes 10")
            if self.n_test is None:
                raise ValueError("source 'sklearn_digits' needs n_test (size of its test split, e.g. 360)")
        if self.source == "torchvision":
            want = {"CIFAR10": 10, "CIFAR100": 100, "SVHN": 10}[self.name]
            if (self.channels, self.image_size, self.num_classes) != (3, 32, want):
                raise ValueError(f"{self.name} is 32x32 RGB with {want} classes: set channels 3, image_size 32, num_classes {want}")
        return self


Augment = Literal["crop_flip", "flip", "none"]


class DataConfig(Strict):
    """Batches of one method. The p(x) stream (JEM family) is a second, independent loader."""

    batch_size: int = Field(ge=1)
    px_batch_size: int | None = Field(None, ge=1, description="second p(x) batch stream; null: none")
    augment: Augment = "crop_flip"
    noise_std: Fraction = Field(0.0, ge=0.0, description="x + N(0, s^2) in pixel units, not clamped (JEM family: 0.015 = their 0.03 in [-1,1] units)")
    px_augment: Augment | None = Field(None, description="augmentation of the p(x) stream; null: same as augment")
    px_noise_std: Fraction | None = Field(None, ge=0.0, description="noise of the p(x) stream; null: same as noise_std")
    crop_padding: Literal["reflect", "zeros"] = Field(
        "reflect", description="padding of crop_flip's 4-px crop: reflect (JEM family: tr.Pad(4, padding_mode='reflect')) "
                               "or zeros (TRADES/MART/MAIL/WEAT: transforms.RandomCrop(32, padding=4))")
    holdout: bool = Field(True, description="train without the data set's n_valid held-out images (JEM, JEM++); "
                                            "false: train on all training images (TRADES, MART, MAIL, WEAT), select.rule must be 'last'")
    drop_last: bool = Field(True, description="drop the last partial batch of an epoch (JEM family); false: keep it "
                                              "(torch DataLoader default, TRADES/MART/MAIL/WEAT)")


# --------------------------------------------------------------------------- splits


@dataclass
class TensorSplit:
    """uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: Tensor
    labels: Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {self.images.dtype} {tuple(self.images.shape)}")
        self.labels = self.labels.long()
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Tensor) -> TensorSplit:
        return TensorSplit(self.images[index], self.labels[index])

    def float01(self) -> Tensor:
        """All images as float [0,1]."""
        return self.images.float().div_(255)


@dataclass
class Splits:
    train: TensorSplit
    valid: TensorSplit
    test: TensorSplit
    classes: list[str]
    source: str = ""        # what was actually read (e.g. "imagefolder:/path", "torchvision-files:/path")


def load_splits(cfg: DatasetConfig, seed: int | None = None) -> Splits:
    """Read the data set described by `cfg` (root already resolved) and split off validation.

    The validation split (`cfg.n_valid` images) and the optional `cfg.n_train`
    subset are drawn from the training images by a generator seeded with
    `seed` (default `cfg.split_seed`).
    """
    if cfg.root is None and cfg.source != "sklearn_digits":
        raise ValueError("DatasetConfig.root is not resolved; get the config from ProfileConfig.dataset(key)")
    if cfg.source == "sklearn_digits":
        train, test, classes, source = _read_digits(cfg.n_test)
    elif cfg.source == "torchvision":
        train, test, classes, source = _read_torchvision(cfg)
    else:
        train, test, classes, source = _read_imagefolder_root(Path(cfg.root), cfg, dataset=cfg.root)
    if source.startswith("imagefolder"):
        test = mix_classes(test, cfg.split_seed)
    if len(classes) != cfg.num_classes:
        raise ValueError(f"{source}: found {len(classes)} classes but num_classes is {cfg.num_classes}; fix the data set's num_classes")
    train, valid = split_train_valid(train, cfg.n_valid, cfg.split_seed if seed is None else seed, n_train=cfg.n_train)
    return Splits(train=train, valid=valid, test=test, classes=classes, source=source)


def mix_classes(split: TensorSplit, seed: int) -> TensorSplit:
    """A fixed, seeded order for a split read class by class (ImageFolder).

    Evaluation, Fisher scores, energy statistics and landscapes take the first n test images
    (RobustBench's convention); in folder order those would all be one class.
    """
    return split.subset(torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)))


def split_train_valid(train: TensorSplit, n_valid: int, seed: int, *, n_train: int | None = None) -> tuple[TensorSplit, TensorSplit]:
    """Random (seeded) disjoint train/valid split.

    Train keeps the original order (loaders shuffle it); valid keeps the random order, so the
    first n validation images used for model selection are a uniform draw, not a few classes.
    """
    if n_valid >= len(train):
        raise ValueError(f"n_valid={n_valid} leaves no training images (only {len(train)}); lower n_valid")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    valid_idx, train_idx = perm[:n_valid], perm[n_valid:]
    if n_train is not None:
        train_idx = train_idx[:n_train]
    return train.subset(train_idx.sort().values), train.subset(valid_idx)


def training_split(splits: Splits, holdout: bool) -> TensorSplit:
    """The images a method trains on: `splits.train` (holdout, JEM/JEM++: 45k of CIFAR's 50k), or train and
    valid together (TRADES, MART, MAIL, WEAT train on all 50k; their selection is then the last epoch)."""
    if holdout or len(splits.valid) == 0:
        return splits.train
    return TensorSplit(torch.cat([splits.train.images, splits.valid.images]),
                       torch.cat([splits.train.labels, splits.valid.labels]))


# --------------------------------------------------------------------------- sources


def _read_digits(n_test: int) -> tuple[TensorSplit, TensorSplit, list[str], str]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).mul(255 / 16).round().clamp(0, 255).to(torch.uint8)[:, None]
    labels = torch.from_numpy(digits.target).long()
    idx_train, idx_test = train_test_split(torch.arange(len(labels)).numpy(), test_size=n_test,
                                           stratify=labels.numpy(), random_state=0)
    idx_train, idx_test = torch.from_numpy(idx_train).sort().values, torch.from_numpy(idx_test).sort().values
    split = TensorSplit(images, labels)
    return split.subset(idx_train), split.subset(idx_test), [str(k) for k in range(10)], "sklearn_digits"


TORCHVISION_FILES = {"CIFAR10": ["cifar-10-batches-py"], "CIFAR100": ["cifar-100-python"],
                     "SVHN": ["train_32x32.mat", "test_32x32.mat"]}


def _read_torchvision(cfg: DatasetConfig) -> tuple[TensorSplit, TensorSplit, list[str], str]:
    root = Path(cfg.root)
    files = ", ".join(TORCHVISION_FILES[cfg.name])
    if _has_imagefolder(root):
        return _read_imagefolder_root(root, cfg, dataset=cfg.name)
    tried = [f"ImageFolder layout {root}/train/<class>/* and {root}/test/<class>/*: not found"]
    if all((root / f).exists() for f in TORCHVISION_FILES[cfg.name]):
        try:
            train, test, classes = _torchvision_splits(cfg.name, root, download=False)
            return train, test, classes, f"torchvision-files:{root}"
        except (RuntimeError, OSError) as err:
            tried.append(f"torchvision files ({files}) in {root}: {_first_line(err)}")
    else:
        tried.append(f"torchvision files ({files}) in {root}: not found")
    if cfg.download:
        try:
            train, test, classes = _torchvision_splits(cfg.name, root, download=True)
            return train, test, classes, f"torchvision-download:{root}"
        except Exception as err:  # noqa: BLE001 - any network/IO failure means "unavailable"
            tried.append(f"torchvision download into {root}: {type(err).__name__}: {_first_line(err)}")
    else:
        tried.append("torchvision download: not tried (download: false for this data set)")
    raise DataUnavailableError(
        f"data set {cfg.name} is not available.\nTried:\n" + "".join(f"  - {t}\n" for t in tried)
        + "Provide a local copy, either\n"
        f"  - an ImageFolder root: {root}/train/<class>/*.png and {root}/test/<class>/*.png, or\n"
        f"  - the torchvision files ({files}) in {root},\n"
        "and point to it with env ROBUST_EBM_DATA_ROOT (its <dataset key> subfolder), params paths.data_root,\n"
        "or the data set's own `root`; or allow network access with download: true.")


def _torchvision_splits(name: str, root: Path, *, download: bool) -> tuple[TensorSplit, TensorSplit, list[str]]:
    import torchvision.datasets as tvd

    if name == "SVHN":
        sets = [tvd.SVHN(str(root), split=s, download=download) for s in ("train", "test")]
        splits = [TensorSplit(torch.from_numpy(d.data), torch.as_tensor(d.labels)) for d in sets]
        return splits[0], splits[1], [str(k) for k in range(10)]
    cls = {"CIFAR10": tvd.CIFAR10, "CIFAR100": tvd.CIFAR100}[name]
    sets = [cls(str(root), train=t, download=download) for t in (True, False)]
    splits = [TensorSplit(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(d.targets))
              for d in sets]
    return splits[0], splits[1], list(sets[0].classes)


def locate(cfg: DatasetConfig) -> tuple[bool, str]:
    """(can the data stage read it, where it is or where it looked): `robust-ebm check`'s data line.

    True also when nothing is local but torchvision may download it (`download: true`)."""
    if cfg.source == "sklearn_digits":
        return True, "ships with scikit-learn (offline)"
    root = Path(cfg.root)
    if _has_imagefolder(root):
        return True, f"ImageFolder layout at {root}"
    looked = f"looked for {root}/train/<class>/* with {root}/test (or val)/<class>/*"
    if cfg.source == "torchvision":
        files = TORCHVISION_FILES[cfg.name]
        if all((root / f).exists() for f in files):
            return True, f"torchvision files {', '.join(files)} in {root}"
        looked += f" and torchvision files {', '.join(files)} in {root}"
        if cfg.download:
            return True, f"not found locally ({looked}); the data stage will try torchvision's download into {root}"
    return False, (f"MISSING ({looked}); put it there, or point env ROBUST_EBM_DATA_ROOT, paths.data_root or "
                   "the data set's root to a copy" + ("" if cfg.source != "torchvision" else ", or set download: true"))


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _has_imagefolder(root: Path) -> bool:
    return (root / "train").is_dir() and any((root / s).is_dir() for s in ("test", "val"))


def _read_imagefolder_root(root: Path, cfg: DatasetConfig, *, dataset: str) -> tuple[TensorSplit, TensorSplit, list[str], str]:
    if not _has_imagefolder(root):
        raise DataUnavailableError(
            f"data set {dataset}: no ImageFolder layout at {root} (need {root}/train/<class>/* and "
            f"{root}/test/<class>/* or {root}/val/<class>/*). Put the images there, or point to them with "
            f"env ROBUST_EBM_DATA_ROOT (its <dataset key> subfolder), params paths.data_root, or the data set's `root`.")
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    train, classes = read_image_folder(root / "train", channels=cfg.channels, image_size=cfg.image_size)
    test, test_classes = read_image_folder(test_dir, channels=cfg.channels, image_size=cfg.image_size)
    if test_classes != classes:
        raise ValueError(f"class folders differ between {root / 'train'} and {test_dir}: "
                         f"{sorted(set(classes) ^ set(test_classes))}")
    return train, test, classes, f"imagefolder:{root}"


def read_image_folder(folder: str | Path, *, channels: int = 3, image_size: int | None = None,
                      max_per_class: int | None = None) -> tuple[TensorSplit, list[str]]:
    """Decode folder/<class>/<image> into uint8 tensors (classes in sorted order, as torchvision's ImageFolder).

    Decoded with Pillow; images whose size differs from `image_size` are resized (bilinear, antialiased),
    but all images must share one size. An empty class folder, an image of another size, or a file that
    cannot be decoded is refused (DataUnavailableError naming it) before anything is written.
    `max_per_class` keeps the first files (sorted by name) of each class.
    """
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataUnavailableError(f"no class folders in {folder}; expected {folder}/<class>/<image files>")
    files = []
    for k, name in enumerate(classes):
        found = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise DataUnavailableError(f"class folder {folder / name} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                                       "add its images or remove the folder (and fix num_classes)")
        files += [(p, k) for p in found[:max_per_class]]
    mode = "RGB" if channels == 3 else "L"
    images, size = [], None
    for path, _ in tqdm(files, desc=f"decoding {folder}", unit="img", mininterval=1.0):
        try:
            with Image.open(path) as img:
                if size is None:
                    size, first = img.size, path
                elif img.size != size:
                    raise DataUnavailableError(
                        f"image {path} is {img.size[0]}x{img.size[1]} but {first} (the first one) is {size[0]}x{size[1]}: "
                        "every image of a data set must have one size; resize or remove it")
                img = img.convert(mode)
                if image_size is not None and img.size != (image_size, image_size):
                    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)
                images.append(np.asarray(img).reshape(image_size or img.size[1], image_size or img.size[0], channels))
        except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError, truncated data
            raise DataUnavailableError(f"image {path} cannot be decoded ({type(err).__name__}: {_first_line(err)}); "
                                       "replace or remove the file") from None
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([k for _, k in files], dtype=torch.long)
    return TensorSplit(images, labels), classes


# --------------------------------------------------------------------------- loaders


class TensorLoader:
    """Batches (x, y) of float [0,1] images from an in-memory split, augmented on the batch.

    augment: 'crop_flip' = random 32x32-style crop of the 4-px padded image (`crop_padding` 'reflect' or
    'zeros', see `random_crop`) + horizontal flip (p=0.5); 'flip' = flip only; 'none'. noise_std > 0 adds N(0, noise_std^2) without clamping (JEM).
    All randomness comes from `generator` (CPU), so a seeded generator gives the same batches.
    """

    def __init__(self, split: TensorSplit, batch_size: int, *, augment: str = "none", noise_std: float = 0.0,
                 shuffle: bool = True, drop_last: bool = False, generator: torch.Generator | None = None,
                 device: str | torch.device = "cpu", crop_padding: str = "reflect"):
        if augment not in ("crop_flip", "flip", "none"):
            raise ValueError(f"augment must be 'crop_flip', 'flip' or 'none', got '{augment}'")
        if crop_padding not in PAD_MODES:
            raise ValueError(f"crop_padding must be one of {sorted(PAD_MODES)}, got '{crop_padding}'")
        self.crop_padding = crop_padding
        if batch_size < 1 or (drop_last and len(split) < batch_size):
            raise ValueError(f"batch_size={batch_size} with drop_last={drop_last} gives no batch from {len(split)} images")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size, self.augment, self.noise_std = batch_size, augment, float(noise_std)
        self.shuffle, self.drop_last, self.generator = shuffle, drop_last, generator

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size].to(self.device)
            x = self.images[idx].float().div_(255)
            yield self.transform(x), self.labels[idx]

    def transform(self, x: Tensor) -> Tensor:
        if self.augment == "crop_flip":
            x = random_crop(x, 4, self.generator, padding=self.crop_padding)
        if self.augment in ("crop_flip", "flip"):
            x = random_flip(x, self.generator)
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn(x.shape, generator=self.generator).to(x.device)
        return x


def make_loader(split: TensorSplit, batch_size: int, *, augment: str = "none", noise_std: float = 0.0,
                shuffle: bool = True, drop_last: bool = False, generator: torch.Generator | None = None,
                device: str | torch.device = "cpu", crop_padding: str = "reflect") -> TensorLoader:
    """See `TensorLoader`."""
    return TensorLoader(split, batch_size, augment=augment, noise_std=noise_std, shuffle=shuffle,
                        drop_last=drop_last, generator=generator, device=device, crop_padding=crop_padding)


def random_flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image left-right with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


PAD_MODES = {"reflect": "reflect", "zeros": "constant"}   # crop_padding -> F.pad mode


def random_crop(x: Tensor, pad: int, generator: torch.Generator | None = None, *, padding: str = "reflect") -> Tensor:
    """Pad by `pad` (reflect, or zeros as torchvision's RandomCrop(32, padding=4)), then crop each image
    back to H x W at a random offset in [0, 2 pad]."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode=PAD_MODES[padding])
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]      # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]      # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


# --------------------------------------------------------------------------- class statistics


INFORMATIVE_DIAG_EPS = 1e-4 / 4   # JEM++ / SADA-JEM add 1e-4 I in [-1,1] units = 2.5e-5 I in pixel units


@dataclass
class ClassStats:
    """Per-class statistics of the training images in [0,1]: mean, top principal directions and,
    when the images are attached, the exact class Gaussian of JEM++'s informative init.

    Class Gaussian (`gaussian(k)`): N(mean_k, Σ_k + diag_eps I) with Σ_k the biased (1/n_k) covariance,
    as JEM++ category_mean / init_from_centers (train_jempp.py:132-182) and SADA-JEM
    (multi_center.py:13-44, train_sadajem.py:114-136) compute it; diag_eps = 1e-4 in [-1,1] units.
    Σ_k is kept as its data factor A_k = (X_k - mean_k)^T / sqrt(n_k) (A A^T = Σ_k exactly): no D x D
    matrix. `draw_factor` keeps A_k on the sampling device in the default dtype once a class is used;
    memory of all classes in float32 = the training set: CIFAR-10/100 (45,000 x 3,072) 553 MB,
    Tiny-ImageNet (90,000 x 12,288) 4.4 GB, plus the uint8 images held by the splits (138 MB, 1.1 GB);
    float32 Cholesky factors would take 377 MB, 3.8 GB and 121 GB for 10, 100 and 200 classes.
    A draw costs O(n_k D) (CIFAR-10: 1.4e7 flops). Without attached images (a stats file alone) the
    Gaussian is the low-rank one of the stored basis: N(mean_k, basis_k diag(scales_k^2) basis_k^T + diag_eps I).

    basis_k holds orthonormal principal directions of the unbiased covariance (columns beyond a class's
    rank are zero, scale 0) for WEAT's PCA init; total_variance_k = its trace (variance fractions).
    """

    mean: Tensor            # (K, C, H, W)
    basis: Tensor           # (K, D, r)
    scales: Tensor          # (K, r), descending
    counts: Tensor          # (K,)
    total_variance: Tensor  # (K,)
    diag_eps: float = INFORMATIVE_DIAG_EPS
    images: Tensor | None = None   # (N, C, H, W) training images (uint8 or [0,1] float); never saved
    labels: Tensor | None = None   # (N,)
    _factors: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # draw_factor cache

    def to_dict(self) -> dict:
        return {"mean": self.mean, "basis": self.basis, "scales": self.scales, "counts": self.counts,
                "total_variance": self.total_variance, "diag_eps": self.diag_eps}

    @classmethod
    def from_dict(cls, state: dict) -> ClassStats:
        return cls(**state)

    @property
    def rank(self) -> int:
        return self.basis.shape[-1]

    def attach(self, images: Tensor, labels: Tensor) -> ClassStats:
        """The same statistics with the training images attached (exact class Gaussians)."""
        if images.shape[1:] != self.mean.shape[1:] or labels.shape != (len(images),):
            raise ValueError(f"attach: images {tuple(images.shape)} / labels {tuple(labels.shape)} do not fit "
                             f"class statistics of images {tuple(self.mean.shape[1:])}")
        return replace(self, images=images, labels=labels)

    def gaussian(self, k: int, device=None) -> tuple[Tensor, Tensor]:
        """float64 mean (D,) and factor A (D, m) of class k's covariance (A A^T = Σ_k; see class docstring)."""
        device = torch.device(device) if device is not None else self.mean.device
        if self.images is None:
            mean = self.mean[k].to(device=device, dtype=torch.float64).flatten()
            return mean, (self.basis[k] * self.scales[k]).to(device=device, dtype=torch.float64)
        xk = self.images[(self.labels == k).nonzero().squeeze(1).to(self.images.device)]
        xk = xk.to(device=device, dtype=torch.float64).flatten(1)
        if self.images.dtype == torch.uint8:
            xk = xk / 255.0
        mean = xk.mean(0)
        return mean, (xk - mean).T / len(xk) ** 0.5

    def draw_factor(self, k: int, device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """`gaussian(k)` on `device` in `dtype`, computed once per (class, device, dtype) and kept."""
        key = (k, str(device), dtype)
        if key not in self._factors:
            mean, factor = self.gaussian(k, device)
            self._factors[key] = (mean.to(dtype), factor.to(dtype).contiguous())
        return self._factors[key]


def class_stats(images01: Tensor, labels: Tensor, num_classes: int, max_rank: int,
                diag_eps: float = INFORMATIVE_DIAG_EPS, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> ClassStats:
    """Mean and top principal directions of each class (float64 eigendecomposition on `device`, stored as `dtype`),
    with `images01` attached (ClassStats.gaussian).

    Rank r = min(D, max_k n_k - 1, max_rank); the unbiased covariance (n_k - 1) is used. A class with
    n_k <= D is decomposed through its n_k x n_k Gram matrix, otherwise through its D x D covariance
    (CIFAR-10 with 4,500 images per class: ten 3072 x 3072 eigh, minutes on 2 CPU cores, seconds on a GPU).
    """
    n, *shape = images01.shape
    flat = images01.reshape(n, -1).to(device=device, dtype=torch.float64)
    labels = labels.to(device)
    d = flat.shape[1]
    counts = torch.bincount(labels, minlength=num_classes).cpu()
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"classes {missing} have no training images; class statistics need at least one per class")
    r = int(min(d, int(counts.max()) - 1, max_rank))
    mean = torch.zeros(num_classes, d, dtype=torch.float64, device=device)
    basis = torch.zeros(num_classes, d, r, dtype=torch.float64, device=device)
    scales = torch.zeros(num_classes, r, dtype=torch.float64, device=device)
    total = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for k in tqdm(range(num_classes), desc="class statistics", unit="class", disable=d < 1024):
        xk = flat[labels == k]
        mean[k] = xk.mean(0)
        centred = (xk - mean[k]) / (len(xk) - 1) ** 0.5
        total[k] = centred.pow(2).sum()
        rk = min(r, len(xk) - 1)
        if rk == 0:        # a single image: the mean alone
            continue
        if len(xk) <= d:   # Gram trick: eigenvectors u of X X^T give directions X^T u / sqrt(lambda)
            values, u = torch.linalg.eigh(centred @ centred.T)
            values, u = values.flip(0)[:rk].clamp_min(1e-30), u.flip(1)[:, :rk]
            vectors = centred.T @ u / values.sqrt()
        else:
            values, vectors = torch.linalg.eigh(centred.T @ centred)
            values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        basis[k, :, :rk], scales[k, :rk] = vectors[:, :rk], values[:rk].sqrt()
    return ClassStats(mean=mean.to(dtype).cpu().reshape(num_classes, *shape), basis=basis.to(dtype).cpu(),
                      scales=scales.to(dtype).cpu(), counts=counts, total_variance=total.to(dtype).cpu(), diag_eps=diag_eps,
                      images=images01, labels=labels)


def weat_pca_rank(stats: ClassStats, k: int, fraction: float = 0.95) -> int:
    """WEAT's number of class-PCA components for the init: the leading directions whose cumulative share of
    class k's variance is still below `fraction`.

    WEAT image_generation/utils_func.py (sample_x0_pca) fits sklearn PCA(n_components=None) and keeps
    components_[:argmin(cumsum(explained_variance_) / sum < retained_variance)]: one component fewer than
    reach the fraction (sklearn's own PCA(n_components=fraction) would keep that one too), and none at all
    when the first component alone reaches it (eval.py's retain_variance / 100 = 0.0095: x0 is the class mean).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    share = stats.scales[k].double().pow(2).cumsum(0) / stats.total_variance[k].double()
    below = int((share < fraction).sum())
    full_rank = min(stats.basis.shape[1], int(stats.counts[k]) - 1)
    if below == stats.rank and stats.rank < full_rank:
        raise ValueError(f"class {k}: the stored rank {stats.rank} keeps only {float(share[-1]):.3f} of the variance, "
                         f"less than {fraction}; raise the data set's stats_rank in params.yaml")
    return below


def weat_pca_singular_values(stats: ClassStats, k: int, rank: int) -> Tensor:
    """sklearn's PCA singular_values_ of class k: sqrt((n_k - 1) * variance along each direction)."""
    return stats.scales[k, :rank] * math.sqrt(max(int(stats.counts[k]) - 1, 0))


# --------------------------------------------------------------------------- the data stage's files


def save_prepared(out_dir: str | Path, splits: Splits, stats: ClassStats) -> Path:
    """Write splits.pt and class_stats.pt to out_dir (atomically); return the path of splits.pt."""
    out_dir = Path(out_dir)
    splits_path = atomic_torch_save(_splits_to_dict(splits), out_dir / "splits.pt")
    atomic_torch_save(stats.to_dict(), out_dir / "class_stats.pt")
    return splits_path


def load_prepared(out_dir: str | Path) -> tuple[Splits, ClassStats]:
    """Read what `save_prepared` wrote (torch.load with weights_only=True)."""
    out_dir = Path(out_dir)
    fix = f"rerun the data stage (robust-ebm data ... --out {out_dir})"
    state = load_torch(out_dir / "splits.pt", fix=fix)
    try:
        splits = Splits(**{name: TensorSplit(state[f"{name}_images"], state[f"{name}_labels"])
                           for name in ("train", "valid", "test")}, classes=list(state["classes"]), source=state["source"])
        stats = ClassStats.from_dict(load_torch(out_dir / "class_stats.pt", fix=fix))
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, BadFileError):
            raise
        raise BadFileError(f"{out_dir} does not hold the data stage's splits.pt/class_stats.pt ({err}); {fix}") from None
    return splits, stats.attach(splits.train.images, splits.train.labels)


def _splits_to_dict(splits: Splits) -> dict:
    state = {"classes": list(splits.classes), "source": splits.source}
    for name in ("train", "valid", "test"):
        split = getattr(splits, name)
        state[f"{name}_images"], state[f"{name}_labels"] = split.images.contiguous(), split.labels.contiguous()
    return state
