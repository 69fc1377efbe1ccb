"""The `data` stage: load one data set as a profile configures it and write its splits, class statistics and
data.json (the files: `data.save_prepared`, read back by every later stage with `data.load_prepared`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from .data import JPEG_CIFAR_NOTE, class_stats, load_splits, save_prepared
from .runtime import atomic_write_json, pick_device

if TYPE_CHECKING:
    from .config import Params


def prepare_stage(params: Params, profile: str, dataset: str, out_dir: str | Path) -> dict:
    """Load `dataset` as `profile` configures it; write splits.pt, class_stats.pt and data.json to out_dir."""
    prof = params.profile_config(profile)
    cfg, out_dir = prof.dataset(dataset), Path(out_dir)
    splits = load_splits(cfg)
    fallbacks: list[str] = []
    stats = class_stats(splits.train.float01(), splits.train.labels, cfg.num_classes, cfg.stats_rank,
                        device=pick_device(prof.device, fallbacks))
    splits_path = save_prepared(out_dir, splits, stats)
    summary = {
        "profile": profile, "dataset": dataset, "source": splits.source, "root": cfg.root,
        "counts": {name: len(getattr(splits, name)) for name in ("train", "valid", "test")},
        "num_classes": cfg.num_classes, "image_shape": list(splits.train.images.shape[1:]),
        "split_seed": cfg.split_seed, "classes": splits.classes, "stats_rank": stats.rank,
        "splits_sha256": _sha256(splits_path), "fallbacks": fallbacks,
    }
    if cfg.name == "CIFAR10" and splits.source.startswith("imagefolder"):
        summary["note"] = JPEG_CIFAR_NOTE
    atomic_write_json(out_dir / "data.json", summary)
    return summary


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
