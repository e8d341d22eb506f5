"""The per-user gate on cases with a known answer: corrupted users flagged, untouched ones not, and the share of
unharmed users flagged at most the rule's level."""
from __future__ import annotations

import numpy as np
import pytest

from puma_ray.training.gate import GateConfig, gate_summary, per_user_gate, record_losses

USERS, RECORDS = 2000, 10  # ~10 validation records a user, as on MovieLens-100K's chronological split


def _records(seed=0, users=USERS, records=RECORDS):
    rng = np.random.default_rng(seed)
    ids = np.repeat([f"u{i:05d}" for i in range(users)], records)
    labels = rng.integers(1, 6, len(ids)).astype(np.float64)
    return rng, ids, labels


def test_identity_migration_flags_nobody_and_corrupted_users_are_flagged():
    rng, ids, labels = _records()
    old = np.clip(labels + rng.normal(0, 0.9, len(ids)), 1, 5)
    new = old.copy()  # an identity migration: the same predictions
    corrupted = [f"u{i:05d}" for i in range(0, USERS, 50)]  # 40 users whose prompt a bug ruined
    hit = np.isin(ids, corrupted)
    new[hit] = np.clip(6 - labels[hit] + rng.normal(0, 0.9, hit.sum()), 1, 5)  # the scale read backwards
    table = per_user_gate(ids, "rating", labels, old, new)
    flagged = set(table.loc[table["verdict"] == "worse", "user_id"])
    assert flagged <= set(corrupted) and len(flagged) >= 0.9 * len(corrupted)
    assert (table.loc[~table["user_id"].isin(corrupted), "verdict"] == "unchanged").all()
    summary = gate_summary(table)
    assert summary["worse"] == len(flagged) and summary["users"] == USERS
    assert summary["worst_users"][0]["user_id"] in corrupted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_false_positive_rate_under_no_difference_is_at_most_alpha(seed):
    """Old and new exchangeable (the same error distribution): a user flagged worse is a false positive."""
    rng, ids, labels = _records(seed)
    old = np.clip(labels + rng.normal(0, 0.9, len(ids)), 1, 5)
    new = np.clip(labels + rng.normal(0, 0.9, len(ids)), 1, 5)
    cfg = GateConfig(alpha=0.05)
    table = per_user_gate(ids, "rating", labels, old, new, cfg)
    share_worse = (table["verdict"] == "worse").mean()
    share_better = (table["verdict"] == "better").mean()
    # binomial sd at 2000 users: 0.005; the t-test on ~10 skewed squared-error differences is conservative
    assert share_worse <= cfg.alpha + 0.015 and share_better <= cfg.alpha + 0.015, (share_worse, share_better)


def test_better_users_and_margin():
    rng, ids, labels = _records(users=200)
    old = np.clip(labels + rng.normal(0, 1.2, len(ids)), 1, 5)
    new = labels + rng.normal(0, 0.2, len(ids))  # much closer for everyone
    table = per_user_gate(ids, "rating", labels, old, new)
    assert (table["verdict"] == "better").mean() > 0.8
    assert (table["verdict"] == "worse").sum() == 0
    # a margin larger than any user's gain: nobody counts as better
    table = per_user_gate(ids, "rating", labels, old, new, GateConfig(margin=100.0))
    assert (table["verdict"] == "unchanged").all()


def test_too_few_records_is_unchanged_and_counted():
    ids = np.array(["a", "a", "b", "b", "b", "b"])
    labels = np.array([1.0, 2.0, 3.0, 3.0, 3.0, 3.0])
    old = labels.copy()
    new = labels + 3.0  # every record of both users much worse
    table = per_user_gate(ids, "rating", labels, old, new, GateConfig(min_records=3)).set_index("user_id")
    assert table.loc["a", "verdict"] == "unchanged" and table.loc["b", "verdict"] == "worse"
    assert gate_summary(table.reset_index(), GateConfig(min_records=3))["too_few_records"] == 1


def test_ctr_uses_log_loss():
    labels = np.array([1.0, 0.0])
    assert np.allclose(record_losses("ctr", labels, np.array([0.9, 0.1])), -np.log(0.9))
    rng = np.random.default_rng(0)
    ids = np.repeat([f"u{i}" for i in range(300)], 20)
    y = rng.integers(0, 2, len(ids)).astype(float)
    good = np.where(y == 1, 0.8, 0.2)
    table = per_user_gate(ids, "ctr", y, good, 1 - good)  # the new system inverted every click
    assert (table["verdict"] == "worse").all()


def test_gate_systems_through_a_real_model_and_its_table_and_plot(toy_dataset, tmp_path):
    """Old and new through a real tiny model: untouched users' losses are identical (unchanged, difference exactly
    0), corrupted users' differ; the table round-trips through Parquet and the plot is a PNG."""
    import pyarrow.parquet as pq
    import torch

    from puma_ray.config import TemplateConfig
    from puma_ray.models.backbone import load_backbone
    from puma_ray.models.heads import RatingHead
    from puma_ray.models.prompted_lm import PromptedLM
    from puma_ray.recipes.train_prompts import item_texts
    from puma_ray.reports.gate import gate_markdown, plot_gate, write_gate_table
    from puma_ray.training.gate import System, gate_systems
    from puma_ray.training.records import RecordSet

    plm = PromptedLM(load_backbone("tiny:llama"), TemplateConfig(), 1, item_texts(toy_dataset))
    users = toy_dataset.users
    torch.manual_seed(0)
    head = RatingHead()
    old = torch.randn(len(users), 1, plm.d) * plm.embed_rms
    new = old.clone()
    corrupted = np.arange(0, len(users), 8)
    new[corrupted] = torch.randn(len(corrupted), 1, plm.d) * plm.embed_rms * 30
    records = RecordSet.from_frame(toy_dataset.split("train"), users)
    table = gate_systems("rating", records, System(plm, head, lambda i: old[i]), System(plm, head, lambda i: new[i]),
                         64)
    touched = table["user_id"].isin(users[corrupted].astype(str))
    assert touched.sum() == len(corrupted) and len(table) == len(users)
    assert (table.loc[~touched, "diff"] == 0).all() and (table.loc[~touched, "verdict"] == "unchanged").all()
    assert (table.loc[touched, "diff"] != 0).all()

    path = write_gate_table(table, str(tmp_path))
    back = pq.read_table(path).to_pandas()
    assert back["user_id"].tolist() == table["user_id"].tolist()
    assert np.allclose(back["diff"], table["diff"]) and back["verdict"].tolist() == table["verdict"].tolist()
    assert plot_gate(table, "squared error")[:8] == b"\x89PNG\r\n\x1a\n"
    section = "\n".join(gate_markdown({**gate_summary(table), "table": path}, None))
    assert f"| {len(users)} |" in section and "paired t-test" in section


def test_partial_sums_add_up_to_the_whole_gate():
    """Sums of disjoint passes (as actors return them) give the same table as all records in one place."""
    from puma_ray.training.gate import gate_from_stats, user_loss_stats
    rng, ids, labels = _records(3, users=300)
    old = np.clip(labels + rng.normal(0, 0.9, len(ids)), 1, 5)
    new = np.clip(labels + rng.normal(1.0, 0.9, len(ids)), 1, 5)
    whole = per_user_gate(ids, "rating", labels, old, new)
    order = rng.permutation(len(ids))
    parts = [user_loss_stats(ids[p], "rating", labels[p], old[p], new[p]) for p in np.array_split(order, 7)]
    total = parts[0]
    for part in parts[1:]:
        total = total.add(part, fill_value=0)
    summed = gate_from_stats(total)
    assert summed["user_id"].tolist() == whole["user_id"].tolist()
    np.testing.assert_allclose(summed["diff"], whole["diff"], atol=1e-12)
    np.testing.assert_allclose(summed["p_worse"], whole["p_worse"], rtol=1e-6)
    assert summed["verdict"].tolist() == whole["verdict"].tolist()
    assert (whole["verdict"] == "worse").sum() > 30  # verdicts of both kinds are compared (63 of 300 here)
