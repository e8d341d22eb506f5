"""The per-user gate: is each user's new system (target model + converted prompt) worse than their old one
(source model + old prompt), on that user's own validation records?

Every migration figure is an average; this says how many users a migration made worse. The rule must respect
~10 records a user: a one-sided paired t-test per user on the per-record loss difference (new - old; squared
error for ratings, log loss for clicks), at level `alpha`, plus a `margin` of mean loss below which a difference
is called unchanged whatever the test says. Vectorised over users (group means and variances, Student's t
survival function): a million users cost one pass. Validation records only: the test split is never read, so a
margin or alpha chosen on these numbers is never chosen on test.

Under no real difference the share of users flagged worse is at most `alpha` (`tests/test_gate.py` measures it);
a user with fewer than `min_records` records, or whose differences are all equal, is "unchanged" unless the
difference is exactly the same sign on every record and above the margin (the t-test has no variance to use).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from puma_ray.training.cost import Cost
from puma_ray.training.evaluate import predict
from puma_ray.training.records import PromptFn, RecordSet

VERDICTS = ("worse", "better", "unchanged")


@dataclass
class GateConfig:
    enabled: bool = True  # after conversion: two passes over the validation records (~1/8 of an evaluation)
    alpha: float = 0.05  # one-sided level per user: the share of unharmed users a gate may flag (~10 records each)
    margin: float = 0.0  # mean loss difference (new - old) below which a user counts as unchanged regardless
    min_records: int = 3  # fewer paired records carry no test: such users are "unchanged" (and counted as such)
    worst: int = 20  # users listed by name in the report


def record_losses(task: str, labels: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per-record loss of a prediction: squared error (rating) or log loss of a click probability (ctr)."""
    labels, pred = np.asarray(labels, np.float64), np.asarray(pred, np.float64)
    if task == "rating":
        return (pred - labels) ** 2
    p = np.clip(pred, 1e-7, 1 - 1e-7)
    return -(labels * np.log(p) + (1 - labels) * np.log(1 - p))


STAT_COLUMNS = ("records", "old_sum", "new_sum", "diff_sum", "diff_sqsum")  # what partial passes add up


def user_loss_stats(user_ids: np.ndarray, task: str, labels: np.ndarray, old_pred: np.ndarray,
                    new_pred: np.ndarray) -> pd.DataFrame:
    """Per-user sums of one pass over some records (indexed by user_id): passes over disjoint records (actors'
    batches, shards) add up, so a million users' gate never gathers their records in one place."""
    old, new = record_losses(task, labels, old_pred), record_losses(task, labels, new_pred)
    diff = new - old
    frame = pd.DataFrame({"user_id": np.asarray(user_ids).astype(str), "records": 1, "old_sum": old,
                          "new_sum": new, "diff_sum": diff, "diff_sqsum": diff * diff})
    return frame.groupby("user_id", sort=True)[list(STAT_COLUMNS)].sum()


def gate_from_stats(sums: pd.DataFrame, cfg: GateConfig | None = None) -> pd.DataFrame:
    """One row per user from `user_loss_stats` sums: records, old and new mean loss, their difference, t,
    one-sided p-values, verdict."""
    cfg = cfg or GateConfig()
    n = sums["records"].to_numpy(np.float64)
    mean = sums["diff_sum"].to_numpy() / n
    # sample variance from the sums; clipped at 0 (cancellation when every difference is the same)
    var = np.maximum(sums["diff_sqsum"].to_numpy() - n * mean * mean, 0.0) / np.maximum(n - 1, 1)
    sd = np.where(n > 1, np.sqrt(var), 0.0)
    table = pd.DataFrame({"user_id": sums.index.astype(str), "records": n.astype(np.int64),
                          "old_loss": sums["old_sum"].to_numpy() / n, "new_loss": sums["new_sum"].to_numpy() / n,
                          "diff": mean})
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / (sd / np.sqrt(n))
    # no spread: every record moved by the same amount; a test has nothing to weigh, the sign decides (p 0 or 1).
    # The bound allows the float error of the sums (var from sums of squares loses ~1e-8 relative)
    flat = sd <= 1e-6 * np.maximum(np.abs(mean), 1e-6)
    t = np.where(flat, np.where(mean > 0, np.inf, np.where(mean < 0, -np.inf, 0.0)), t)
    dof = np.maximum(n - 1, 1)
    p_worse = np.where(flat & (mean == 0), 1.0, stats.t.sf(t, dof))
    p_better = np.where(flat & (mean == 0), 1.0, stats.t.cdf(t, dof))
    enough = n >= cfg.min_records
    worse = enough & (p_worse < cfg.alpha) & (mean > cfg.margin)
    better = enough & (p_better < cfg.alpha) & (mean < -cfg.margin)
    table["t"], table["p_worse"], table["p_better"] = t, p_worse, p_better
    table["verdict"] = np.where(worse, "worse", np.where(better, "better", "unchanged"))
    return table


def per_user_gate(user_ids: np.ndarray, task: str, labels: np.ndarray, old_pred: np.ndarray,
                  new_pred: np.ndarray, cfg: GateConfig | None = None) -> pd.DataFrame:
    """The gate over records in one place: `gate_from_stats` of their per-user sums."""
    return gate_from_stats(user_loss_stats(user_ids, task, labels, old_pred, new_pred), cfg)


def gate_summary(table: pd.DataFrame, cfg: GateConfig | None = None) -> dict:
    """Counts per verdict, the distribution of the difference, and the worst users by mean loss increase."""
    cfg = cfg or GateConfig()
    counts = {v: int((table["verdict"] == v).sum()) for v in VERDICTS}
    diff = table["diff"].to_numpy()
    worst = table[table["verdict"] == "worse"].sort_values("diff", ascending=False).head(cfg.worst)
    return {
        "rule": {"test": "one-sided paired t-test per user on validation records", "alpha": cfg.alpha,
                 "margin": cfg.margin, "min_records": cfg.min_records},
        "users": int(len(table)), **counts,
        "share_worse": round(counts["worse"] / max(len(table), 1), 4),
        "too_few_records": int((table["records"] < cfg.min_records).sum()),
        "diff_quantiles": {str(q): float(np.quantile(diff, q)) for q in (0.01, 0.1, 0.5, 0.9, 0.99)}
        if len(diff) else {},
        "worst_users": [{"user_id": r.user_id, "records": int(r.records), "old_loss": round(float(r.old_loss), 4),
                         "new_loss": round(float(r.new_loss), 4), "p": float(r.p_worse)}
                        for r in worst.itertuples()],
    }


@dataclass
class System:
    """One side of the gate: a frozen model (PromptedLM), its task head and each user's prompt (by record row)."""
    plm: Any
    head: Any
    prompts_for: PromptFn


def system_loss_sums(task: str, records: RecordSet, old: System, new: System, batch_size: int,
                     cost: Cost | None = None) -> pd.DataFrame:
    """Per-user loss sums (`user_loss_stats`) of the old system against the new on the same records: one
    prediction pass of each. What an executor returns for its share of the users."""
    old_pred = predict(old.plm, old.head, task, old.prompts_for, records, batch_size, cost)
    new_pred = predict(new.plm, new.head, task, new.prompts_for, records, batch_size, cost)
    return user_loss_stats(records.user_ids, task, records.labels, old_pred, new_pred)


def gate_systems(task: str, records: RecordSet, old: System, new: System, batch_size: int,
                 cfg: GateConfig | None = None, cost: Cost | None = None) -> pd.DataFrame:
    """The per-user table of the old system against the new on the same records (each user's validation
    records): `gate_from_stats` of `system_loss_sums`."""
    return gate_from_stats(system_loss_sums(task, records, old, new, batch_size, cost), cfg)
