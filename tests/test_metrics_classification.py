import numpy as np
import pytest

from glmae.metrics.classification import auc, summarise_auc


def pairwise_auc(truth, scores):
    """AUC as the probability that a positive outscores a negative (ties count half), by hand."""
    pos = [s for t, s in zip(truth, scores) if t == 1]
    neg = [s for t, s in zip(truth, scores) if t == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_by_hand():
    truth = [0, 0, 1, 1]
    assert auc(truth, [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)  # one of four pairs inverted
    assert auc(truth, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc(truth, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auc(truth, [0.5, 0.5, 0.5, 0.5]) == 0.5  # ties


def test_against_scikit_learn_and_the_pairwise_definition():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    truth = rng.random((50, 3)) < [0.2, 0.5, 0.7]
    scores = rng.random((50, 3)) + truth * [0.5, 0.1, 0.0]
    scores[:10, 1] = np.round(scores[:10, 1], 1)  # some ties
    m = summarise_auc(truth.astype(int), scores, ["a", "b", "c"])
    for k, name in enumerate("abc"):
        assert m["per_class"][name] == pytest.approx(roc_auc_score(truth[:, k], scores[:, k]))
        assert m["per_class"][name] == pytest.approx(pairwise_auc(truth[:, k], scores[:, k]))
    assert m["mean_auc"] == pytest.approx(np.mean(list(m["per_class"].values())))
    assert m["n_cases"] == 50 and m["positives"]["a"] == int(truth[:, 0].sum()) and m["undefined"] == []


def test_a_finding_with_one_class_has_no_auc_and_is_left_out_of_the_mean():
    truth = np.array([[0, 1], [0, 0], [0, 1], [0, 0]])
    scores = np.array([[0.1, 0.9], [0.2, 0.1], [0.3, 0.8], [0.4, 0.2]])
    m = summarise_auc(truth, scores, ["absent", "present"])
    assert m["per_class"] == {"absent": None, "present": 1.0}
    assert m["mean_auc"] == 1.0 and m["undefined"] == ["absent"]
    assert summarise_auc(truth[:, :1], scores[:, :1], ["absent"])["mean_auc"] is None
    with pytest.raises(ValueError):
        summarise_auc(truth, scores[:, :1], ["absent", "present"])
