"""Metrics over ALL held-out records (never an average of per-batch values): RMSE, MAE, AUC, uAUC."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def rmse(y, pred) -> float:
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    return float(np.sqrt(np.mean((y - pred) ** 2)))


def mae(y, pred) -> float:
    return float(np.mean(np.abs(np.asarray(y, np.float64) - np.asarray(pred, np.float64))))


def auc(y, score) -> float:
    return float(roc_auc_score(np.asarray(y), np.asarray(score)))


def uauc(user_ids, y, score) -> float:
    """Mean per-user AUC over the users that have both classes (others carry no ranking signal)."""
    user_ids, y, score = np.asarray(user_ids), np.asarray(y), np.asarray(score)
    order = np.argsort(user_ids, kind="stable")
    user_ids, y, score = user_ids[order], y[order], score[order]
    bounds = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1], True])
    aucs = [roc_auc_score(y[a:b], score[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if 0 < y[a:b].sum() < b - a]
    return float(np.mean(aucs)) if aucs else float("nan")


def task_metrics(task: str, user_ids, y, pred) -> dict:
    if task == "rating":
        return {"rmse": rmse(y, pred), "mae": mae(y, pred), "records": int(len(y))}
    return {"auc": auc(y, pred), "uauc": uauc(user_ids, y, pred), "records": int(len(y))}

