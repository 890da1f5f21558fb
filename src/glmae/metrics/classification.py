"""Multi-label classification metrics: the area under the ROC curve per finding and their mean
(ChestX-ray14's protocol), computed with scikit-learn's `roc_auc_score`.

A finding whose truth has only one class among the scored images (all negative, or all
positive) has no AUC: it is None in `per_class`, left out of `mean_auc` and named in `undefined`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def auc(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC of scores (N,) for 0/1 truth (N,); None when truth holds one class only."""
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(truth).astype(int)
    if truth.min(initial=0) == truth.max(initial=0):
        return None
    return float(roc_auc_score(truth, np.asarray(scores, dtype=np.float64)))


def summarise_auc(truth: np.ndarray, scores: np.ndarray, names: Sequence[str]) -> dict:
    """truth (N, K) 0/1 and scores (N, K) (probabilities or logits) -> {"mean_auc", "per_class"
    (name -> AUC or None), "undefined" (names without an AUC), "n_cases", "positives" (name ->
    count)}. `mean_auc` is the mean over the findings with an AUC (None if there are none)."""
    truth, scores = np.asarray(truth), np.asarray(scores)
    if truth.shape != scores.shape or truth.ndim != 2 or truth.shape[1] != len(names):
        raise ValueError(f"truth {truth.shape} and scores {scores.shape} must both be (N, {len(names)})")
    per_class = {name: auc(truth[:, k], scores[:, k]) for k, name in enumerate(names)}
    defined = [v for v in per_class.values() if v is not None]
    return {
        "mean_auc": float(np.mean(defined)) if defined else None,
        "per_class": per_class,
        "undefined": [n for n, v in per_class.items() if v is None],
        "n_cases": int(truth.shape[0]),
        "positives": {name: int(truth[:, k].sum()) for k, name in enumerate(names)},
    }
