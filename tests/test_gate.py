"""The per-user gate on cases with a known answer: corrupted users flagged, untouched ones not, and the share of
unharmed users flagged at most the rule's level."""
from __future__ import annotations

import numpy as np
import pandas as pd
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


def test_gate_through_a_real_model_and_the_conversion_path_flags_exactly_the_corrupted_users(tmp_path):
    """The known answer end to end on the real parts: a store on a real HF model (tiny:llama), an identity
    migration (the same model as target, an identity linear adapter) through the exactly-once conversion, read
    back, and gated by the same System/gate code the migration uses. Before converting, a test corrupts some
    users' prompts in the store it converts (a bug upstream of the adapter). The labels are the old system's own
    predictions, so each corrupted user's new loss is above the old one on every record (flagged however small
    the change: the t-test is scale-free), and each untouched user's predictions are bit-identical (unchanged).
    Swapping old and new turns the verdicts into 'better': the gate reads which side is which."""
    import torch

    from puma_ray.artifacts.adapter_io import save_adapter
    from puma_ray.artifacts.store import PromptStore, write_store
    from puma_ray.config import TemplateConfig, to_dict
    from puma_ray.conversion.plan import ConvertConfig
    from puma_ray.conversion.run import convert
    from puma_ray.models.adapter import AdapterConfig, PromptAdapter
    from puma_ray.models.backbone import load_backbone
    from puma_ray.models.heads import RatingHead, head_config, load_head
    from puma_ray.models.prompted_lm import PromptedLM
    from puma_ray.training.evaluate import predict
    from puma_ray.training.gate import System, gate_systems
    from puma_ray.training.records import RecordSet
    rng = np.random.default_rng(0)
    users, items, per_user = np.array([f"u{i:03d}" for i in range(60)]), [f"i{j}" for j in range(20)], 8
    backbone = load_backbone("tiny:llama")
    identity, template = backbone.identity, TemplateConfig()
    plm = PromptedLM(backbone, template, 1, {i: f"item {i}" for i in items})
    prompts = (rng.standard_normal((len(users), 1, plm.d)) * plm.embed_rms).astype(np.float32)
    corrupted = set(users[::7])
    shipped = prompts.copy()
    rows = np.isin(users, sorted(corrupted))
    shipped[rows] = -3.0 * prompts[rows]  # the scale read backwards and blown up
    head = RatingHead()
    for name, table in (("old", prompts), ("shipped", shipped)):
        write_store(str(tmp_path / name), identity, users, table, head.state_dict(), head_config("rating", head),
                    template=to_dict(template), task="rating", shard_rows=16)
    adapter = PromptAdapter([plm.d], plm.d, AdapterConfig(kind="linear"), seed=0)
    with torch.no_grad():
        adapter.net.weight.copy_(torch.eye(plm.d))
        adapter.net.bias.zero_()
    meta = {"sources": [vars(identity)], "target": vars(identity), "prompt_length": 1, "task": "rating"}
    save_adapter(str(tmp_path / "adapter"), adapter, head, head_config("rating", head), meta)
    summary = convert(str(tmp_path / "adapter"), [str(tmp_path / "shipped")], str(tmp_path / "target"),
                      ConvertConfig(progress=False), log=lambda m: None)
    assert summary["users"] == len(users)

    target = PromptStore.open(str(tmp_path / "target"))
    ids, converted = target.read_all()
    converted = converted[pd.Index(ids).get_indexer(users)]
    assert np.array_equal(converted[~rows], prompts[~rows])  # the identity adapter is exact on untouched users
    frame = pd.DataFrame({"user_id": np.repeat(users, per_user),
                          "item_id": rng.choice(items, len(users) * per_user), "label": 0.0})
    records = RecordSet.from_frame(frame, users)
    old_prompts, new_prompts = torch.from_numpy(prompts), torch.from_numpy(converted)
    old = System(plm, head, lambda idx: old_prompts[idx])
    new = System(plm, load_head(*target.read_head()), lambda idx: new_prompts[idx])
    frame["label"] = predict(plm, head, "rating", old.prompts_for, records, 64)  # the old system is right
    records = RecordSet.from_frame(frame, users)

    table = gate_systems("rating", records, old, new, batch_size=64)
    verdict = dict(zip(table["user_id"], table["verdict"]))
    assert {u for u, v in verdict.items() if v == "worse"} == corrupted
    assert all(verdict[u] == "unchanged" for u in users if u not in corrupted)
    swapped = gate_systems("rating", records, new, old, batch_size=64)
    assert set(swapped.loc[swapped["verdict"] == "better", "user_id"]) == corrupted
