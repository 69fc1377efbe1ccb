"""The JEM-family papers' IS/FID protocol: which buffer rows it keeps, and IS/FID computed on exactly those."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robust_ebm.config import TopConfidentConfig
from robust_ebm.metrics.buffer_protocol import top_confident, top_confident_metrics
from robust_ebm.metrics.frechet import frechet_distance_to_stats, inception_score_from_probs
from robust_ebm.metrics.inception import ReferenceStats


def test_top_confident_keeps_a_fraction_or_a_count_per_predicted_class():
    # predicted classes 0,0,0,1,1 (class 2 empty); confidences rise with the second logit's margin
    logits = torch.tensor([[3.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0], [0, 5.0, 0], [0, 1.0, 0]])
    assert top_confident(logits, 0.9, 3).tolist() == [0, 2, 3]       # int(3 * .9) = 2, int(2 * .9) = 1
    assert top_confident(logits, 0.1, 3).tolist() == []              # int(0.3) = int(0.2) = 0
    assert top_confident(logits, 2, 3).tolist() == [0, 2, 3, 4]      # a count per class
    assert top_confident(logits, 1, 3).tolist() == [0, 3]            # ratio 1 is a count of one, as in cond_is_fid
    assert sorted(top_confident(logits, 10_000, 3).tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="ratio"):
        top_confident(logits, 0, 3)


class FakeInception(nn.Module):
    """(pool features, logits) from uint8 images: a fixed random projection (plumbing only)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, 6)

    def forward(self, x):
        f = self.proj(x.float().flatten(1) / 255)
        return f, f[:, :5] * 3


def test_metrics_are_is_and_fid_of_the_chosen_rows():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (60, 3, 4, 4), dtype=torch.uint8)
    logits = torch.randn(60, 3) * 3
    net = FakeInception()
    with torch.no_grad():
        feats, out = net(images)
    feats, probs = feats.double(), torch.softmax(out.double(), 1)
    ref = ReferenceStats(np.zeros(6), np.eye(6), 100, "k")
    cfg = TopConfidentConfig(is_ratios=[0.5, 5], fid_ratios=[0.9], splits=2)
    got = top_confident_metrics(images, logits, cfg, ref, net=net, batch_size=16)
    idx = top_confident(logits, 0.5, 3)
    assert got["n_top50pct"] == len(idx) and got["n_top5"] == 15
    assert got["is_top50pct"] == pytest.approx(inception_score_from_probs(probs[idx], 2)[0], rel=1e-6)
    idx = top_confident(logits, 0.9, 3)
    assert got["fid_top90pct"] == pytest.approx(frechet_distance_to_stats(feats[idx], ref.mu, ref.sigma), rel=1e-6)
    with pytest.raises(ValueError, match="logits"):
        top_confident_metrics(images, logits[:10], cfg, ref, net=net)


def test_too_few_images_for_a_ratio_are_written_down_not_scored():
    torch.manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    logits = torch.randn(6, 3)
    cfg = TopConfidentConfig(is_ratios=[0.1], fid_ratios=[1], splits=2)   # int(n_c * 0.1) = 0; one image per class
    got = top_confident_metrics(images, logits, cfg, ReferenceStats(np.zeros(6), np.eye(6), 9, "k"), net=FakeInception())
    assert got["n_top10pct"] == 0 and got["is_top10pct"].startswith("not computed: the top 0.1 holds 0")
    assert isinstance(got["fid_top1"], float) == (got["n_top1"] >= 2)
