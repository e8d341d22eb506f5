"""Metrics against scikit-learn, and the reference predictors on a frame small enough to compute by hand."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import mean_absolute_error, mean_squared_error, roc_auc_score

from puma_ray.errors import ConfigError
from puma_ray.metrics import auc, mae, rmse, task_metrics, uauc
from puma_ray.tasks import get_task
from puma_ray.training.reference import reference_metrics, reference_predictions


@pytest.fixture
def rng():
    return np.random.default_rng(42)


def test_rmse_mae_match_sklearn(rng):
    y = rng.integers(1, 6, 500).astype(np.float32)
    pred = rng.uniform(1, 5, 500)
    assert rmse(y, pred) == pytest.approx(math.sqrt(mean_squared_error(y, pred)), rel=1e-12)
    assert mae(y, pred) == pytest.approx(mean_absolute_error(y, pred), rel=1e-12)
    assert rmse(y, y) == 0.0 and mae(y, y) == 0.0
    # plain lists work, and the result is a python float
    assert isinstance(rmse([1, 2], [2, 2]), float) and rmse([1, 3], [2, 2]) == pytest.approx(1.0)
    assert mae([1, 3, 5], [2, 2, 2]) == pytest.approx(5 / 3)


def test_auc_matches_sklearn(rng):
    y = rng.integers(0, 2, 400)
    score = rng.normal(size=400) + 0.7 * y
    assert auc(y, score) == pytest.approx(roc_auc_score(y, score), rel=1e-12)
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0


def _uauc_reference(user_ids, y, score) -> float:
    """The obvious per-user loop: AUC of each user with both classes, averaged over those users."""
    per_user = []
    for u in np.unique(user_ids):
        m = user_ids == u
        if len(np.unique(y[m])) == 2:
            per_user.append(roc_auc_score(y[m], score[m]))
    return float(np.mean(per_user))


def test_uauc_matches_per_user_loop(rng):
    n = 1500
    user_ids = rng.choice([f"u{i:02d}" for i in range(40)], n)  # unsorted, interleaved users
    y = rng.integers(0, 2, n)
    score = rng.normal(size=n) + 0.5 * y
    # users with one class only (and a single-record user) carry no ranking signal and are excluded
    y[user_ids == "u03"] = 1
    y[user_ids == "u07"] = 0
    user_ids = np.append(user_ids, "solo")
    y, score = np.append(y, 1), np.append(score, 0.0)
    expected = _uauc_reference(user_ids, y, score)
    assert uauc(user_ids, y, score) == pytest.approx(expected, rel=1e-12)
    # the excluded users really are excluded: the mean is over 40 - 2 users
    assert uauc(user_ids, y, score) != pytest.approx(auc(y, score), rel=1e-6)


def test_uauc_hand_case_and_no_eligible_user():
    # user a: perfectly ranked (1.0); user b: inverted (0.0); user c: one class, excluded → mean 0.5
    ids = np.array(["a", "b", "a", "c", "b", "c"])
    y = np.array([1, 1, 0, 1, 0, 1])
    s = np.array([0.9, 0.1, 0.2, 0.5, 0.8, 0.4])
    assert uauc(ids, y, s) == pytest.approx(0.5)
    assert math.isnan(uauc(["a", "a"], [1, 1], [0.2, 0.3]))


def test_task_metrics_and_better():
    m = task_metrics("rating", ["a", "b"], [1.0, 3.0], [2.0, 3.0])
    assert m == {"rmse": pytest.approx(math.sqrt(0.5)), "mae": pytest.approx(0.5), "records": 2}
    c = task_metrics("ctr", ["a", "a", "b", "b"], [0, 1, 1, 0], [0.1, 0.9, 0.2, 0.8])
    # pooled: 3 of 4 positive/negative pairs ordered; per user: a 1.0, b 0.0
    assert c["auc"] == pytest.approx(0.75) and c["uauc"] == pytest.approx(0.5) and c["records"] == 4
    assert get_task("rating").better(0.9, 1.0) and not get_task("rating").better(1.0, 0.9)
    assert get_task("ctr").better(0.7, 0.6) and not get_task("ctr").better(0.6, 0.7)
    assert get_task("rating").primary == "rmse" and get_task("ctr").primary == "auc"
    with pytest.raises(ConfigError, match="unknown task 'regression'"):
        get_task("regression")


# ------------------------------------------------------------------------------------------------ reference predictors
@pytest.fixture
def hand_frames():
    train = pd.DataFrame({"user_id": ["a", "a", "a", "b", "b"], "item_id": ["x", "y", "z", "x", "y"],
                          "label": [5.0, 4.0, 3.0, 2.0, 1.0]})
    test = pd.DataFrame({"user_id": ["a", "b", "c"], "item_id": ["x", "z", "w"], "label": [4.0, 2.0, 3.0]},
                        index=[10, 11, 12])
    return train, test


def test_reference_global_and_user_means_by_hand(hand_frames):
    train, test = hand_frames
    pred = reference_predictions(train, test)
    # global mean: (5+4+3+2+1)/5 = 3; user a: (5+4+3)/3 = 4, user b: (2+1)/2 = 1.5, unseen user c: the global mean
    assert pred["global_mean"].tolist() == [3.0, 3.0, 3.0]
    assert pred["user_mean"].tolist() == [4.0, 1.5, 3.0]
    for p in pred.values():
        assert list(p.index) == [10, 11, 12]  # aligned with the test frame
    # bias: an unseen user and unseen item get no bias: exactly the global mean
    assert pred["bias"].loc[12] == pytest.approx(3.0)
    # user a rates above the mean, user b below: their biases must say so
    assert pred["bias"].loc[10] > 3.0 > pred["bias"].loc[11]


def test_reference_metrics_by_hand(hand_frames):
    train, test = hand_frames
    m = reference_metrics("rating", train, test)
    assert set(m) == {"global_mean", "user_mean", "bias"}
    # global mean 3 against [4, 2, 3]: errors 1, 1, 0
    assert m["global_mean"]["rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert m["global_mean"]["mae"] == pytest.approx(2 / 3)
    # user means [4, 1.5, 3] against [4, 2, 3]: errors 0, .5, 0
    assert m["user_mean"]["rmse"] == pytest.approx(math.sqrt(0.25 / 3))
    assert m["user_mean"]["mae"] == pytest.approx(0.5 / 3)
    assert m["user_mean"]["records"] == 3


def test_reference_clamps_ratings():
    """User a rates everything 5 and item x is everyone's favourite: mu + b_u + b_i lands far above 5."""
    rows = [("a", f"i{k}", 5.0) for k in range(30)]
    for u in range(30):
        rows += [(f"b{u}", "x", 5.0)] + [(f"b{u}", f"i{k}", 1.0) for k in range(30)]
    train = pd.DataFrame(rows, columns=["user_id", "item_id", "label"])
    test = pd.DataFrame({"user_id": ["a"], "item_id": ["x"], "label": [5.0]})
    assert reference_predictions(train, test)["bias"].iloc[0] > 5.5
    m = reference_metrics("rating", train, test)
    assert m["bias"]["rmse"] == 0.0 and m["bias"]["mae"] == 0.0  # clamped to 5 before scoring
