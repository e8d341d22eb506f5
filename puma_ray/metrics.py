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



def partial_metrics(task: str, user_ids, y, pred) -> dict:
    """What one part of a record set contributes, for `merge_partial_metrics` to give exactly `task_metrics` of the
    whole: rating, the sums of squared and absolute errors (float64); ctr, each user's AUC (a part must hold every
    record of its users) and the scores with their labels (the global AUC ranks all of them together: 12 bytes a
    record reach the merge, no model work)."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    if task == "rating":
        return {"records": int(len(y)), "sse": float(np.sum((y - pred) ** 2)), "sae": float(np.sum(np.abs(y - pred)))}
    user_ids = np.asarray(user_ids)
    order = np.argsort(user_ids, kind="stable")
    u, ys, ps = user_ids[order], y[order], pred[order]
    bounds = np.flatnonzero(np.r_[True, u[1:] != u[:-1], True])
    aucs = [roc_auc_score(ys[a:b], ps[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if 0 < ys[a:b].sum() < b - a]
    return {"records": int(len(y)), "user_aucs": [float(a) for a in aucs], "scores": pred.astype(np.float32),
            "labels": y.astype(np.int8)}


def merge_partial_metrics(task: str, parts: list[dict]) -> dict:
    n = sum(p["records"] for p in parts)
    if task == "rating":
        return {"rmse": float(np.sqrt(sum(p["sse"] for p in parts) / n)),
                "mae": float(sum(p["sae"] for p in parts) / n), "records": int(n)}
    aucs = [a for p in parts for a in p["user_aucs"]]
    return {"auc": auc(np.concatenate([p["labels"] for p in parts]), np.concatenate([p["scores"] for p in parts])),
            "uauc": float(np.mean(aucs)) if aucs else float("nan"), "records": int(n)}
