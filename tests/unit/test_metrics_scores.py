"""FID / KID / IS / precision-recall formulas against float64 references computed here."""

import numpy as np
import pytest
import scipy.linalg

from ddlab.metrics import features_to_stats, frechet_distance, inception_score, kid, precision_recall


def _fid_ref(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    expected = 1.0 + 0.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, abs=1e-10)


def test_fid_general_covariances_match_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 6)), rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu1, s1 = features_to_stats(a)
    mu2, s2 = features_to_stats(b)
    np.testing.assert_allclose(mu1, a.mean(0))
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False))  # unbiased (N - 1)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fid_ref(mu1, s1, mu2, s2), rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_rejects_mismatched_feature_sizes():
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kid_matches_unbiased_mmd_with_cubic_kernel():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 5)), rng.normal(size=(20, 5)) + 0.3
    d = x.shape[1]

    def k(a, b):
        return (a @ b.T / d + 1.0) ** 3

    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    mmd = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2
    # one subset holding every sample: a permutation, which MMD does not see
    out = kid(x, y, subsets=1, subset_size=100)
    assert out["kid_subset_size"] == 20
    assert out["kid_mean"] == pytest.approx(mmd, rel=1e-9)
    assert out["kid_std"] == 0.0


def test_inception_score_extremes():
    k = 8
    confident = np.full((64, k), -30.0)
    confident[np.arange(64), np.arange(64) % k] = 30.0  # each image sure of its class, classes balanced
    assert inception_score(confident, splits=1)["is_mean"] == pytest.approx(k, rel=1e-6)
    assert inception_score(np.zeros((64, k)), splits=4)["is_mean"] == pytest.approx(1.0, abs=1e-12)
    # hand computation for two images, p = softmax(logits)
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    q = p.mean(0)
    expected = np.exp(np.mean((p * (np.log(p) - np.log(q))).sum(1)))
    assert inception_score(logits, splits=1)["is_mean"] == pytest.approx(expected, rel=1e-12)


def test_precision_recall_identical_and_disjoint_sets():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(30, 4))
    same = precision_recall(a, a)
    assert same == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(a + 100.0, a)
    assert far == {"precision": 0.0, "recall": 0.0}
