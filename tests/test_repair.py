"""Repair and polish of a finished migration (recipes/repair.py, conversion/patch.py) on tiny models: a repair
changes exactly the flagged users' prompts and nothing else, the new version verifies against its base and
patch, polish changes everyone, the budgets hold, and bad input is one line, exit 2, nothing written."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import puma_ray.recipes.migration as migration
from puma_ray.config import from_dict
from puma_ray.data import save_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FLAGGED = 5
TRAIN = {"epochs": 2, "batch_size": 16, "patience": 1, "lr": 0.05}


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def migrated(one_torch_thread, toy_dataset, tmp_path_factory):
    """A finished migration run folder (stablelm → llama, 40 toy users, report.json written as the job does) whose
    gate table flags FLAGGED users worse (the ones with the largest loss increase)."""
    from puma_ray.recipes.runs import report_path, write_report
    paths = save_dataset(toy_dataset, str(tmp_path_factory.mktemp("toy_data")))
    out = str(tmp_path_factory.mktemp("run"))
    cfg = from_dict(migration.MigrateJobConfig, {
        "sources": [{"store": "{output}/source-store", "model": {"name": "tiny:stablelm"},
                     "prepare": {"epochs": 2, "batch_size": 32, "patience": 1, "lr": 0.02}}],
        "target": {"name": "tiny:llama"}, "data": {"name": "parquet", "paths": paths},
        "selection": {"strategy": "kmeans_variance", "budget": 10, "k": 4, "valid_users": 4},
        "fit": {"epochs": 2, "batch_size": 32, "patience": 1}, "store": {"shard_rows": 16},
        "baselines": {"linear": False, "random_init": False, "source": False}}, "test")
    report = migration.run(cfg, out, log=_quiet)
    write_report(report_path(out), "migrate", report)
    table_path = Path(report["gate"]["table"])
    table = pq.read_table(table_path).to_pandas()
    flagged = table.sort_values("diff", ascending=False)["user_id"].head(FLAGGED).tolist()
    hit = table["user_id"].isin(flagged)
    table.loc[hit, "verdict"] = "worse"
    table.loc[hit, "p_worse"] = np.linspace(0.001, 0.01, FLAGGED)[np.argsort(np.argsort(
        -table.loc[hit, "diff"].to_numpy()))]  # the largest increase: the smallest p
    table.loc[~hit & (table["verdict"] == "worse"), "verdict"] = "unchanged"
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), buf)
    table_path.write_bytes(buf.getvalue())
    order = table[hit].sort_values("p_worse")["user_id"].tolist()
    return out, report, order


def _repair(run_dir, output, **fields):
    from puma_ray.recipes.repair import RepairJobConfig, run
    cfg = from_dict(RepairJobConfig, {"run": run_dir, "train": TRAIN, **fields}, "test")
    return run(cfg, str(output), log=_quiet)


def test_repair_changes_exactly_the_flagged_users_and_verifies(migrated, tmp_path):
    from puma_ray.artifacts.store import PromptStore
    from puma_ray.artifacts.verify import verify_store
    from puma_ray.conversion.patch import changed_users
    run_dir, report, flagged = migrated
    out = _repair(run_dir, tmp_path / "repair")
    assert out["users_trained"] == FLAGGED and out["choice"]["candidates"] == FLAGGED
    changed = changed_users(report["store"], out["store"])
    assert set(changed[changed].index) == set(flagged), "exactly the flagged users' prompts change"
    assert len(changed) == report["conversion"]["users"]  # the rest: byte-identical rows, nobody added or lost
    summary = verify_store(out["store"])  # default sources: the base and the patch its lineage names
    assert summary["users"] == len(changed) and len(summary["sources_checked"]) == 2
    new, base = PromptStore.open(out["store"]), PromptStore.open(report["store"])
    # a repair never moves the shared head: the same tensors and config (its file's bytes may be laid out anew)
    (new_state, new_cfg), (base_state, base_cfg) = new.read_head(), base.read_head()
    assert new_cfg == base_cfg and set(new_state) == set(base_state)
    assert all(torch.equal(new_state[k], base_state[k]) for k in base_state)
    lineage, prov = new.manifest.lineage, new.manifest.provenance
    assert lineage["kind"] == "repaired" and lineage["base"] == report["store"] and lineage["patched_users"] == 5
    assert prov["migration_run"] == run_dir and prov["gate_table"]["table"] == report["gate"]["table"]
    assert sorted(prov["users"]["list"]) == sorted(flagged) and prov["package"].startswith("puma_ray ")
    assert prov["config"]["mode"] == "repair" and prov["config"]["train"]["epochs"] == TRAIN["epochs"]
    # the report: test RMSE before/after over every user, the worse share before/after, passes spent
    assert out["test"]["before"]["records"] == out["test"]["after"]["records"]
    assert out["test"]["before"]["rmse"] == pytest.approx(report["methods"][report["adapter_choice"]["shipped"]]
                                                          ["rmse"], abs=1e-6)
    assert out["gate"]["before"]["worse"] == FLAGGED and out["gate"]["after"]["users"] == report["gate"]["users"]
    assert out["cost"]["repair"]["llm_record_passes"] > 0
    # a rerun of the same repair into the same folder: refused (a finished patch), one line
    from puma_ray.artifacts.store import StoreError
    with pytest.raises(StoreError, match="already exists"):
        _repair(run_dir, tmp_path / "repair")


def test_polish_changes_every_user(migrated, tmp_path):
    from puma_ray.artifacts.verify import verify_store
    from puma_ray.conversion.patch import changed_users
    run_dir, report, _ = migrated
    out = _repair(run_dir, tmp_path / "polish", mode="polish", train_head=True)
    assert out["training"]["best_epoch"] >= 0, "an epoch beat the warm start on validation"
    changed = changed_users(report["store"], out["store"])
    assert changed.all() and out["users_trained"] == len(changed)
    verify_store(out["store"])


def test_budgets_in_users_and_record_passes(migrated, tmp_path):
    from puma_ray.conversion.patch import changed_users
    run_dir, report, flagged = migrated
    out = _repair(run_dir, tmp_path / "two", max_users=2)
    changed = changed_users(report["store"], out["store"])
    assert set(changed[changed].index) == set(flagged[:2]), "the most clearly worse first"
    one_user = _repair(run_dir, tmp_path / "one", max_users=1)["choice"]["planned_passes"]
    budget = one_user + 1  # room for the first user, not the second
    out = _repair(run_dir, tmp_path / "passes", max_record_passes=budget)
    assert out["users_trained"] == 1 and out["choice"]["planned_passes"] <= budget
    assert out["cost"]["repair"]["llm_record_passes"] <= budget


@pytest.mark.parametrize("case", ["no_gate_table", "user_not_in_store", "no_report"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, migrated, tmp_path, capsys, load_job):
    run_dir, report, _ = migrated
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    rewritten = json.loads((copy / "report.json").read_text().replace(run_dir, str(copy)))
    (copy / "report.json").write_text(json.dumps(rewritten))
    args = ["--output", str(tmp_path / "out"), f"run={copy}"]
    if case == "no_gate_table":
        (copy / "gate" / "users.parquet").unlink()
        expect = f"error: {copy}/gate/users.parquet: gate table missing"
    elif case == "user_not_in_store":
        args.append("users=[u001,nobody]")  # an override after the run
        expect = "error: users: user 'nobody' is not in the target store"
    else:
        (copy / "report.json").unlink()
        expect = f"error: {copy}/report.json: missing"
    code = load_job("repair").main(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(expect), lines
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # ~2 min on 2 cores: a Ray Train start
def test_repair_on_ray_train_is_the_in_process_one(migrated, tmp_path):
    """runs_on ray (one Ray Train worker, warm start read from the store by the worker) gives the in-process
    repair's prompts: the same start, batches and steps."""
    import ray

    from puma_ray.artifacts.store import PromptStore
    from puma_ray.artifacts.verify import verify_store
    from puma_ray.ray_layer import ensure_ray
    run_dir, report, flagged = migrated
    local = _repair(run_dir, tmp_path / "local")
    ensure_ray(num_cpus=2)
    try:
        on_ray = _repair(run_dir, tmp_path / "ray", runs_on="ray")
    finally:
        ray.shutdown()
    verify_store(on_ray["store"])
    want_ids, want = PromptStore.open(local["patch_store"]).read_all()
    got_ids, got = PromptStore.open(on_ray["patch_store"]).read_all()
    assert got_ids.tolist() == want_ids.tolist() == sorted(flagged)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert on_ray["training"]["best_epoch"] == local["training"]["best_epoch"]
    assert on_ray["cost"]["repair"]["llm_record_passes"] == local["cost"]["repair"]["llm_record_passes"]
