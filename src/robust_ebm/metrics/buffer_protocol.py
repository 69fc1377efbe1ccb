"""The JEM-family papers' own IS/FID protocol: score the most confident part of the replay buffer.

JEM++, SADA-JEM and EB-JDAT do not score their whole buffer. `Task/eval_buffer.py::cond_is_fid`
(SADA-JEM, EB-JDAT; JEM++'s eval_jempp.py::cond_fid is the same rule) classifies every buffer image,
groups the images by **predicted** class, and keeps in each group the `ratio` most confident ones
(max softmax probability), `int(len(group) * ratio)` of them for ratio < 1 and `int(ratio)` for
ratio >= 1 (a count: JEM++'s README passes 10000, "ratio >= buffer size, use all images"):

    SADA-JEM eval_sadajem.py:549-550   IS on ratio 0.1, FID on ratio 0.9 (TF Inception, vs CIFAR-10 train+test)
    EB-JDAT eval_sadajem.py:473-474    the same calls; but its eval_is_fid computes nothing for eval='is', and the
                                       IS it prints comes from the ratio-0.9 call (torchmetrics, uint8 input)
    EB-JDAT eval_jem.py:548            FID (and the printed IS) on ratio 0.9
    JEM++ eval_jempp.py:589 + README   FID on ratio 10000 = every image

`top_confident` returns the buffer rows in the reference's order (class 0's rows by decreasing
confidence, then class 1's, ...); tests/test_golden_generate.py checks it against cond_is_fid.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_confident(logits: Tensor, ratio: float, num_classes: int) -> Tensor:
    """Rows of the images cond_is_fid scores: per predicted class, the top `ratio` by max softmax (ratio >= 1: a count)."""
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0 (a fraction below 1, or a count per class), got {ratio}")
    predicted = logits.argmax(1)
    confidence = torch.softmax(logits, dim=1).max(1).values
    chosen = []
    for c in range(num_classes):
        rows = (predicted == c).nonzero().squeeze(1)
        k = min(int(len(rows) * ratio) if ratio < 1 else int(ratio), len(rows))
        chosen.append(rows[torch.topk(confidence[rows], k).indices])
    return torch.cat(chosen)


def top_confident_metrics(images: Tensor, logits: Tensor, cfg, reference, *, net, batch_size: int = 64) -> dict:
    """IS for each of cfg.is_ratios and FID for each of cfg.fid_ratios on the top-confident rows of a buffer.

    images uint8 (N,C,H,W); logits (N,K) of the float buffer; reference the Inception ReferenceStats of
    cfg.reference. Keys: is_<label>, is_std_<label>, fid_<label>, n_<label> (TopConfidentConfig.label: 'top10pct').
    """
    from .frechet import frechet_distance_to_stats, inception_score_from_probs
    from .inception import inception_outputs

    if len(logits) != len(images):
        raise ValueError(f"{len(logits)} logits for {len(images)} images; rerun the generate stage")
    num_classes = logits.shape[1]
    feats, probs = inception_outputs(net, images, batch_size=batch_size, desc="inception (buffer)")
    out = {"protocol": (f"JEM++/SADA-JEM/EB-JDAT cond_is_fid: per predicted class the top ratio by max softmax of "
                        f"the model (ratio >= 1: a count); IS ratios {cfg.is_ratios} ({cfg.splits} splits), FID ratios "
                        f"{cfg.fid_ratios} vs {cfg.reference} (n_ref {reference.n}); torch-fidelity Inception, uint8 input"),
           "reference_set": cfg.reference}
    for kind, ratios in (("is", cfg.is_ratios), ("fid", cfg.fid_ratios)):
        for ratio in ratios:
            idx, key = top_confident(logits, ratio, num_classes), cfg.label(ratio)
            out[f"n_{key}"] = len(idx)
            if len(idx) < 2:   # a buffer too small for this ratio (e.g. int(n_c * 0.1) = 0 in every class)
                out[f"{kind}_{key}"] = f"not computed: the top {ratio} holds {len(idx)} image(s)"
            elif kind == "is":
                out[f"is_{key}"], out[f"is_std_{key}"] = inception_score_from_probs(probs[idx], min(cfg.splits, len(idx)))
            else:
                out[f"fid_{key}"] = frechet_distance_to_stats(feats[idx], reference.mu, reference.sigma)
    return out
