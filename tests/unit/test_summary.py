"""The run summary's ROC-AUC: the probability that a random positive outscores a random negative (ties half)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.summary import roc_auc


def brute_force_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = scores[positive], scores[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_equals_pair_counting_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 7, size=200).astype(float)  # many ties
    positive = rng.random(200) < 0.3 + 0.05 * scores
    assert roc_auc(scores, positive) == pytest.approx(brute_force_auc(scores, positive), abs=1e-12)


def test_roc_auc_extremes_and_one_class():
    scores = np.array([0.1, 0.2, 0.8, 0.9])
    assert roc_auc(scores, np.array([False, False, True, True])) == 1.0
    assert roc_auc(scores, np.array([True, True, False, False])) == 0.0
    assert roc_auc(np.ones(4), np.array([True, False, True, False])) == 0.5
    assert roc_auc(scores, np.zeros(4, dtype=bool)) is None
