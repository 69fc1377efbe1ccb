"""Metrics: IS/FID (Inception and reference classifier), Fisher scores, energy statistics, and their stage."""

from .energy_stats import compute_energies, energy_report, mean_gap, paired_delta, summarize
from .fisher import exact_trace, fisher_scores, hutchinson_trace, score_matching_terms
from .frechet import feature_stats, frechet_distance, frechet_distance_to_stats, inception_score_from_probs
from .inception import InceptionWeightsUnavailable, inception_metrics, resolve_inception_weights
from .refclf import refclf_metrics
from .stage import metrics_stage

__all__ = [
    "InceptionWeightsUnavailable", "compute_energies", "energy_report", "exact_trace", "feature_stats",
    "fisher_scores", "frechet_distance", "frechet_distance_to_stats", "hutchinson_trace", "inception_metrics", "inception_score_from_probs",
    "mean_gap", "metrics_stage", "paired_delta", "refclf_metrics", "resolve_inception_weights",
    "score_matching_terms", "summarize",
]
