"""IS / FID computed with a reference classifier instead of Inception (a labelled stand-in).

For profiles without Inception weights (offline `smoke`, digits 8x8, ...) the pipeline trains a
standard classifier on the same data set. Its penultimate features replace Inception's pool3 and
its softmax replaces Inception's class probabilities, in the same closed forms (`frechet`):

    fid_refclf = FID(refclf.features(x_gen), refclf.features(x_ref))
    is_refclf  = exp(E KL(softmax(refclf(x_gen)) || mean softmax))
    class_consistency_refclf = mean[argmax refclf(x_gen) == y_gen]   (does the sample look like its class?)

These numbers are comparable only between runs with the same reference classifier, never with
Inception FID/IS; hence their names always end in `_refclf`.
"""

from __future__ import annotations

import torch

from ..inference import batched_outputs
from .frechet import feature_stats, frechet_distance_to_stats, inception_score_from_probs


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] -> float [0,1] (floats are passed through)."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images


def classifier_outputs(model, images: torch.Tensor, *, batch_size: int = 256, desc: str = "refclf"):
    """(penultimate features, softmax probabilities) of a `Classifier` in eval mode, float64 CPU."""
    device = next(model.parameters()).device

    def step(batch):
        h = model.features(to_unit(batch).to(device))
        return h.double(), torch.softmax(model.fc(h).double(), dim=1)

    return batched_outputs(model, step, images, batch_size=batch_size, desc=desc)


def refclf_reference_stats(model, reference: torch.Tensor, *, batch_size: int = 256) -> tuple:
    """(mu, sigma, n) of the reference images' refclf features: computed once per stage, shared by all generators."""
    ref_feats, _ = classifier_outputs(model, reference, batch_size=batch_size, desc="refclf (reference)")
    return (*feature_stats(ref_feats), len(reference))


def refclf_metrics(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    reference: torch.Tensor | None = None,
    *,
    ref_stats: tuple | None = None,
    splits: int = 10,
    batch_size: int = 256,
) -> dict:
    """{"fid_refclf", "is_refclf", "is_std_refclf", "class_consistency_refclf", "n", "n_ref"}.

    The reference set is given as images (`reference`) or as their `refclf_reference_stats` (`ref_stats`).
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} generated images but {len(labels)} labels")
    if (reference is None) == (ref_stats is None):
        raise ValueError("give the reference set either as images (reference) or as refclf_reference_stats (ref_stats)")
    mu, sigma, n_ref = ref_stats if ref_stats is not None else refclf_reference_stats(model, reference, batch_size=batch_size)
    feats, probs = classifier_outputs(model, images, batch_size=batch_size, desc="refclf (samples)")
    is_mean, is_std = inception_score_from_probs(probs, min(splits, len(images)))
    return {
        "fid_refclf": frechet_distance_to_stats(feats, mu, sigma),
        "is_refclf": is_mean,
        "is_std_refclf": is_std,
        "class_consistency_refclf": (probs.argmax(1) == labels.cpu()).double().mean().item(),
        "n": len(images),
        "n_ref": n_ref,
    }
