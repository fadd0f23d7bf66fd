"""FID, KID, Inception Score and precision/recall from features, through torch-fidelity's formulas.

FID uses the cached reference ``mu, sigma`` (no second pass over the real images); KID and
precision/recall need the reference features themselves (``ReferenceStats.features``).
Precision/recall are computed on the same Inception pool features as FID (torch-fidelity's own
default for ``prc`` is VGG-16, whose weights would be a second download).
"""

from __future__ import annotations

import numpy as np
import torch

from .reference import ReferenceStats, features_to_stats


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})`` (torch-fidelity's implementation), float64."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    s1 = {"mu": np.asarray(mu1, np.float64), "sigma": np.atleast_2d(np.asarray(sigma1, np.float64))}
    s2 = {"mu": np.asarray(mu2, np.float64), "sigma": np.atleast_2d(np.asarray(sigma2, np.float64))}
    if s1["mu"].shape != s2["mu"].shape:
        raise ValueError(f"feature sizes differ: {s1['mu'].shape} vs {s2['mu'].shape} (statistics from another feature extractor?)")
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


def kid(features_gen: np.ndarray, features_ref: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 2020) -> dict:
    """Kernel Inception Distance (cubic polynomial kernel, unbiased MMD^2) over random subsets;
    ``subset_size`` is capped at the smaller set. Returns ``kid_mean``, ``kid_std``."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = int(min(subset_size, len(features_gen), len(features_ref)))
    if size < 2:
        raise ValueError("KID needs at least 2 images on each side")
    out = kid_features_to_metric(torch.as_tensor(features_gen, dtype=torch.float64), torch.as_tensor(features_ref, dtype=torch.float64),
                                 kid_subsets=int(subsets), kid_subset_size=size, verbose=False, rng_seed=seed,
                                 kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    return {"kid_mean": out[KEY_METRIC_KID_MEAN], "kid_std": out[KEY_METRIC_KID_STD], "kid_subset_size": size}


def inception_score(logits: np.ndarray, splits: int = 10, seed: int = 2020) -> dict:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` chunks (capped at N)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    n = len(logits)
    out = isc_features_to_metric(torch.as_tensor(logits, dtype=torch.float64), splits=int(max(1, min(splits, n))), shuffle=True, rng_seed=seed)
    return {"is_mean": out[KEY_METRIC_ISC_MEAN], "is_std": out[KEY_METRIC_ISC_STD]}


def precision_recall(features_gen: np.ndarray, features_ref: np.ndarray, neighborhood: int = 3) -> dict:
    """Improved precision/recall (Kynkaanniemi et al. 2019) with k-NN balls of size ``neighborhood``."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    k = int(min(neighborhood, len(features_gen) - 1, len(features_ref) - 1))
    if k < 1:
        raise ValueError("precision/recall need at least 2 images on each side")
    out = prc_features_to_metric(torch.as_tensor(features_gen, dtype=torch.float32), torch.as_tensor(features_ref, dtype=torch.float32),
                                 prc_neighborhood=k, prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    return {"precision": out[KEY_METRIC_PRECISION], "recall": out[KEY_METRIC_RECALL]}


def compute_scores(gen: dict, ref: ReferenceStats, fid: bool = True, kid_: bool = False, isc: bool = False, prc: bool = False,
                   kid_subsets: int = 100, kid_subset_size: int = 1000, isc_splits: int = 10) -> dict:
    """Scores of generated features ``gen`` (``{"fid": (N, D), "logits": (N, K)}``) against
    ``ref``. Keys: ``fid``, ``kid_mean``/``kid_std``, ``is_mean``/``is_std``, ``precision``/``recall``."""
    out: dict = {}
    g = np.asarray(gen["fid"], dtype=np.float64)
    if fid:
        mu, sigma = features_to_stats(g)
        out["fid"] = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    if (kid_ or prc) and ref.features is None:
        raise ValueError(f"KID / precision-recall need the reference features, which {ref.path} does not hold")
    if kid_:
        out.update(kid(g, ref.features, kid_subsets, kid_subset_size))
    if isc:
        out.update(inception_score(gen["logits"], isc_splits))
    if prc:
        out.update(precision_recall(g, ref.features))
    return out
