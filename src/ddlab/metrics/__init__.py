"""Evaluation metrics: Inception features (torch-fidelity), cached reference statistics, FID, KID,
Inception Score, precision/recall."""

from .evaluator import EXTRACTORS, Evaluator, dataset_images_uint8, make_features
from .inception import InceptionFeatures, resolve_weights, to_uint8_nchw3
from .reference import ReferenceStats, features_to_stats, load_stats, reference_key, reference_stats, save_stats
from .samples import load_sample_labels, load_samples, save_samples_npz
from .scores import compute_scores, frechet_distance, inception_score, kid, precision_recall

__all__ = [
    "EXTRACTORS",
    "Evaluator",
    "make_features",
    "InceptionFeatures",
    "ReferenceStats",
    "compute_scores",
    "dataset_images_uint8",
    "features_to_stats",
    "frechet_distance",
    "inception_score",
    "kid",
    "load_sample_labels",
    "load_samples",
    "load_stats",
    "precision_recall",
    "reference_key",
    "reference_stats",
    "resolve_weights",
    "save_samples_npz",
    "save_stats",
    "to_uint8_nchw3",
]
