"""The batches training reads: the labelled stream and, for JEM-family methods, an independent p(x) stream.

Epoch e's order and augmentation come from generators seeded by (seed, e, stream), so the
batches of an epoch can be replayed: `Streams.epoch(e, skip=k)` starts at batch k, which is how
a resumed run continues bit-exactly in the middle of an epoch.
"""

from __future__ import annotations

import itertools

import torch

from . import data
from .methods import Batch
from .runtime import derive_seed


class Streams:
    """Replayable epochs of `Batch(x, y, x_px)` over the training split (module docstring)."""

    def __init__(self, split, dcfg, *, needs_px: bool, seed: int, device):
        # Move the uint8 split to the device once; every epoch's loaders then index it in place.
        split = data.TensorSplit(split.images.to(device), split.labels.to(device))
        self.split, self.dcfg, self.seed, self.device = split, dcfg, seed, device
        n = len(split.labels)
        self.steps_per_epoch = n // dcfg.batch_size if dcfg.drop_last else -(-n // dcfg.batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training split has {n} images, fewer than one batch of {dcfg.batch_size}; "
                             "lower data.batch_size or use a larger data set")
        self.px_batch = (dcfg.px_batch_size or dcfg.batch_size) if needs_px else None
        if self.px_batch is not None and self.px_batch > n:
            raise ValueError(f"data.px_batch_size {self.px_batch} exceeds the {n} training images")

    def _loader(self, batch_size, augment, noise_std, *key, drop_last=True):
        g = torch.Generator().manual_seed(derive_seed(self.seed, *key))
        return data.make_loader(self.split, batch_size, augment=augment, noise_std=noise_std, shuffle=True,
                                drop_last=drop_last, generator=g, device=self.device,
                                crop_padding=self.dcfg.crop_padding)

    def _px(self, epoch: int):
        d = self.dcfg
        augment = d.px_augment if d.px_augment is not None else d.augment
        noise = d.px_noise_std if d.px_noise_std is not None else d.noise_std
        for cycle in itertools.count():
            yield from self._loader(self.px_batch, augment, noise, epoch, "px", cycle)

    def epoch(self, epoch: int, skip: int = 0):
        labelled = self._loader(self.dcfg.batch_size, self.dcfg.augment, self.dcfg.noise_std, epoch, "labelled",
                                drop_last=self.dcfg.drop_last)
        px = self._px(epoch) if self.px_batch is not None else None
        for i, (x, y) in enumerate(labelled):
            if i >= self.steps_per_epoch:
                return
            x_px = next(px)[0] if px is not None else None
            if i >= skip:
                yield Batch(x=x, y=y, x_px=x_px)
