"""Reference predictors on the same split as the prompts: what an LLM-free system gets for nothing.

global mean, per-user mean, and user+item bias (mu + b_u + b_i, damped means, alternated a few times), all fitted
on the train split only and clamped to 1..5 like the model's predictions.
"""
from __future__ import annotations

import pandas as pd

from puma_ray.metrics import task_metrics
from puma_ray.tasks import get_task

DAMPING = 5.0  # shrinks the bias of users/items with few ratings toward 0 (a standard baseline regulariser)
ROUNDS = 10  # alternating b_i / b_u updates; converged well before this on MovieLens


def reference_predictions(train: pd.DataFrame, test: pd.DataFrame) -> dict[str, pd.Series]:
    mu = float(train["label"].mean())
    user_mean = train.groupby("user_id")["label"].mean()
    b_u = pd.Series(0.0, index=user_mean.index)
    b_i = pd.Series(dtype=float)
    for _ in range(ROUNDS):
        resid = train["label"] - mu - train["user_id"].map(b_u).fillna(0.0)
        g = resid.groupby(train["item_id"])
        b_i = g.sum() / (g.size() + DAMPING)
        resid = train["label"] - mu - train["item_id"].map(b_i).fillna(0.0)
        g = resid.groupby(train["user_id"])
        b_u = g.sum() / (g.size() + DAMPING)
    bias = mu + test["user_id"].map(b_u).fillna(0.0) + test["item_id"].map(b_i).fillna(0.0)
    return {
        "global_mean": pd.Series(mu, index=test.index),
        "user_mean": test["user_id"].map(user_mean).fillna(mu),
        "bias": bias,
    }


def reference_metrics(task: str, train: pd.DataFrame, test: pd.DataFrame) -> dict[str, dict]:
    out = {}
    for name, pred in reference_predictions(train, test).items():
        pred = pred.clip(*get_task(task).clamp)
        out[name] = task_metrics(task, test["user_id"].to_numpy(), test["label"].to_numpy(), pred.to_numpy())
    return out
