"""Closed-form statistics shared by every IS / FID computation (Inception or reference classifier).

FID (Heusel et al. 2017) between Gaussians N(mu1, S1) and N(mu2, S2) fitted to features:

    FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

IS (Salimans et al. 2016) from class probabilities p(y|x) of N images:

    IS = exp( E_x KL(p(y|x) || p(y)) ),  p(y) = E_x p(y|x),

computed on `splits` disjoint chunks; we report the mean and std over chunks.
"""

from __future__ import annotations

import numpy as np
import torch


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N-1) covariance of a (N, D) feature matrix, in float64."""
    feats = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"feature_stats needs a (N, D) matrix with N >= 2, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (tiny negative eigenvalues clipped)."""
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2).

    tr((S1 S2)^{1/2}) is computed as sum sqrt(eig(S1^{1/2} S2 S1^{1/2})): the same closed form as
    pytorch-fid's scipy.linalg.sqrtm(S1 S2) (S1 S2 is similar to that symmetric PSD matrix), but
    real by construction and stable when the covariances are singular (fewer images than feature
    dimensions), so it needs no eps*I offset and no imaginary-part check; it is also ~5x faster at D=2048.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}; "
            "both sets must come from the same feature extractor"
        )
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_to_stats(features, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID between the Gaussian fit of (N, D) `features` and N(mu, sigma); the same value as
    frechet_distance(*feature_stats(features), mu, sigma).

    With N <= D the sample covariance S = XᵀX/(N-1) (X centred) has rank < N, and
    sigma^{1/2} S sigma^{1/2} has the same non-zero eigenvalues as the
    N x N matrix X sigma Xᵀ/(N-1), so the trace term costs O(N D²) instead of O(D³).
    """
    feats = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"FID needs a (N, D) feature matrix with N >= 2, got shape {feats.shape}")
    n, d = feats.shape
    if n - 1 >= d:
        return frechet_distance(*feature_stats(feats), mu, sigma)
    if np.shape(mu) != (d,) or np.shape(sigma) != (d, d):
        raise ValueError(f"mismatched statistics: features of dim {d}, reference mu {np.shape(mu)}, sigma {np.shape(sigma)}")
    centred = feats - feats.mean(axis=0)
    small = centred @ np.asarray(sigma, np.float64) @ centred.T / (n - 1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0.0, None)).sum()
    diff = feats.mean(axis=0) - mu
    return float(diff @ diff + (centred**2).sum() / (n - 1) + np.trace(sigma) - 2.0 * tr_covmean)


def inception_score_from_probs(
    probs: torch.Tensor | np.ndarray, splits: int = 10, *, seed: int = 2020
) -> tuple[float, float]:
    """(mean, std) over `splits` chunks of exp(E_x KL(p(y|x) || p(y))).

    Rows are shuffled with a fixed seed first (as torch-fidelity does): generated sets are often
    stored class by class, and a chunk holding one class would have a spuriously low score.
    """
    p = torch.as_tensor(probs, dtype=torch.float64).detach().cpu()
    if p.ndim != 2 or p.shape[0] < splits or splits < 1:
        raise ValueError(f"IS needs a (N, K) probability matrix with N >= splits={splits}, got shape {tuple(p.shape)}")
    if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(p.shape[0], dtype=p.dtype), atol=1e-4):
        raise ValueError("IS expects rows of probabilities (non-negative, summing to 1); pass softmax(logits)")
    p = p[torch.randperm(p.shape[0], generator=torch.Generator().manual_seed(seed))]
    scores = []
    for chunk in torch.tensor_split(p, splits):
        marginal = chunk.mean(0, keepdim=True)
        kl = torch.special.xlogy(chunk, chunk) - torch.special.xlogy(chunk, marginal)
        scores.append(torch.exp(kl.sum(1).mean()).item())
    scores_t = torch.tensor(scores, dtype=torch.float64)
    std = scores_t.std(unbiased=False).item() if splits > 1 else 0.0
    return scores_t.mean().item(), std
