"""The migration recipe end to end on tiny models: single source, a chain A→B→C, aggregated [A, B]→C (with a user
missing from one source), refusal of foreign stores, and the job's config errors.

Every run is small: 40 toy users, 10 selected for the fit, 2 epochs of batch 32; a run takes a couple of seconds.
"""
from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import puma_ray.recipes.migration as migration
from puma_ray.artifacts.adapter_io import load_adapter
from puma_ray.artifacts.store import PromptStore, StoreError, write_store
from puma_ray.config import ConfigError, from_dict
from puma_ray.conversion.run import convert
from puma_ray.data import save_dataset
from puma_ray.errors import AdapterError
from puma_ray.models.backbone import load_backbone

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREPARE = {"epochs": 2, "batch_size": 32, "patience": 1, "lr": 0.02}  # source stores: trained first, briefly
SMALL = {
    "selection": {"strategy": "kmeans_variance", "budget": 10, "k": 4, "valid_users": 4},
    "fit": {"epochs": 2, "batch_size": 32, "patience": 1},
    "store": {"shard_rows": 16},
}
NO_BASELINES = {"linear": False, "random_init": False, "source": False}


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def toy_paths(toy_dataset, tmp_path_factory):
    return save_dataset(toy_dataset, str(tmp_path_factory.mktemp("toy_data")))


def _config(toy_paths, sources, target, **extra):
    data = {"sources": sources, "target": {"name": target}, "data": {"name": "parquet", "paths": toy_paths},
            **SMALL, **extra}
    return from_dict(migration.MigrateJobConfig, data, "test config")


@pytest.fixture(scope="module")
def run_a(one_torch_thread, toy_paths, tmp_path_factory):
    """stablelm → llama, the source store trained first (prepare), every baseline but full retraining."""
    out = str(tmp_path_factory.mktemp("run_a"))
    cfg = _config(toy_paths, [{"store": "{output}/source-store", "model": {"name": "tiny:stablelm"},
                               "prepare": PREPARE}], "tiny:llama")
    return migration.run(cfg, out, log=_quiet), out


# ---------------------------------------------------------------------------------------------- a. single source
def test_single_source_report(run_a, toy_dataset):
    report, out = run_a
    assert report["task"] == "rating"
    assert report["source"]["name"] == "tiny:stablelm" and report["source"]["hidden_size"] == 32
    assert report["target"]["name"] == "tiny:llama" and report["target"]["hidden_size"] == 48
    sel = report["selection"]
    assert {k: sel[k] for k in ("strategy", "k", "budget", "users_selected", "users_total")} == {
        "strategy": "kmeans_variance", "k": 4, "budget": 10, "users_selected": 10, "users_total": 40}
    assert set(report["methods"]) == {"puma", "random_init", "source", "linear"}
    n_test = toy_dataset.summary()["records"]["test"]
    for name, m in report["methods"].items():
        assert math.isfinite(m["rmse"]) and math.isfinite(m["mae"]), name
        assert 0 < m["mae"] <= m["rmse"] < 4, name
        assert m["records"] == n_test, name  # every user's test records, not only the selected users'
    # the reference rows (no LLM) on the same test records, under their own key and in the printed table
    from puma_ray.training.reference import reference_metrics
    assert set(report["reference"]) == {"global_mean", "user_mean", "bias"}
    assert report["reference"] == reference_metrics("rating", toy_dataset.split("train"), toy_dataset.split("test"))
    assert all(m["records"] == n_test for m in report["reference"].values())
    printed = migration.format_report(report)
    assert "bias *" in printed and f"{report['reference']['bias']['rmse']:.4f}" in printed
    # a candidate's longer name keeps every figure in its column: the RMSE column ends at one place in every row
    long = {**report, "methods": {**report["methods"], "adapter_mlp_skip_128": report["methods"]["puma"]}}
    lines = migration.format_report(long).splitlines()
    ends = {line.index("rmse") + 4 for line in lines[:1]}
    ends |= {re.search(r"\d\.\d{4}", line).end() for line in lines[1:] if line.split()[0] in
             ("puma", "adapter_mlp_skip_128", "bias", "global_mean")}
    assert len(ends) == 1, "\n".join(lines)
    assert {"puma", "random_init", "linear"} <= set(report["cost"])
    for name, c in report["cost"].items():
        assert c["wall_s"] >= 0 and c["llm_record_passes"] > 0 and c["flops"] > 0, name
    # the adapter adds its own FLOPs to the same LLM passes
    assert report["cost"]["puma"]["flops"] > report["cost"]["random_init"]["flops"]
    assert report["store"] == f"{out}/target-store" and report["adapter"] == f"{out}/adapter"
    assert report["conversion"]["users"] == 40 and report["conversion"]["rejected"] == 0
    assert f"{out}/source-store" in report["source_training"]


def test_single_source_gate(run_a, toy_dataset):
    """The gate stage: every user with validation records gated, old against new, counts adding up; the table in
    the run folder equals the summary; report.md shows the section and its plot."""
    from puma_ray.reports.markdown import write_migration_report
    report, out = run_a
    gate = report["gate"]
    valid = toy_dataset.split("valid")
    assert gate["users"] == valid["user_id"].nunique() and gate["records"] == len(valid)
    assert gate["worse"] + gate["better"] + gate["unchanged"] == gate["users"]
    assert gate["rule"]["alpha"] == 0.05 and gate["loss"] == "squared error"
    table = pq.read_table(gate["table"]).to_pandas()
    assert gate["table"] == f"{out}/gate/users.parquet" and len(table) == gate["users"]
    assert (table["verdict"] == "worse").sum() == gate["worse"]
    assert (table["old_loss"] > 0).all() and not np.allclose(table["old_loss"], table["new_loss"])
    md = open(write_migration_report(report, out)).read()
    assert "## Per-user gate" in md and "gate.png" in md and Path(out, "gate.png").exists()


def test_the_adapter_validation_picks_converts_everyone(run_a):
    """ship: validation (default): the fitted adapter with the best RMSE on every user's validation records (PUMA
    or the linear map) converted everyone; the report names it, its figures, the fits' own and its artifact."""
    report, out = run_a
    choice = report["adapter_choice"]
    assert set(choice["validation"]) == {"puma", "linear"} and choice["rule"] == "validation"
    assert choice["shipped"] == min(choice["validation"], key=choice["validation"].get)
    assert choice["records"] == report["data"]["records"]["valid"]  # every user's, not the fit's validation users'
    for name, value in choice["fit_validation"].items():
        assert value == pytest.approx(min(h["valid_rmse"] for h in report["fits"][name]["history"]))
    expected = f"{out}/adapter" if choice["shipped"] == "puma" else f"{out}/baselines/linear-adapter"
    assert report["adapter"] == choice["adapter"] == expected
    assert load_adapter(expected)[2]["metrics"] == report["methods"][choice["shipped"]]


def test_single_source_target_store(run_a, toy_dataset):
    report, out = run_a
    source = PromptStore.open(f"{out}/source-store")
    target = PromptStore.open(report["store"])
    ids, prompts = target.read_all()  # refuses duplicates and a wrong count
    assert ids.tolist() == toy_dataset.users.tolist()  # every user, exactly once
    assert prompts.shape == (40, 1, 48) and np.isfinite(prompts).all()
    assert target.identity.fingerprint == report["target"]["fingerprint"]
    assert target.manifest.task == "rating" and target.manifest.template == source.manifest.template
    assert len(target.manifest.shards) == 3  # 40 users at 16 rows a shard, shard by shard from the source's

    lineage = target.manifest.lineage
    assert lineage["kind"] == "migrated"
    assert lineage["adapter"] == report["adapter"]
    assert [s["store"] for s in lineage["sources"]] == [source.path]
    assert lineage["sources"][0]["model"]["fingerprint"] == source.identity.fingerprint
    assert lineage["sources"][0]["lineage"]["kind"] == "trained"
    assert lineage["rejects"]["users"] == 0
    assert target.manifest.provenance["test"] == report["methods"]["puma"]

    # the adapter artifact loads, names the models it maps between, and reproduces the store's prompts
    adapter, head, config = load_adapter(report["adapter"])
    assert config["source_dims"] == [32] and config["target_dim"] == 48
    assert config["sources"][0]["fingerprint"] == source.identity.fingerprint
    assert config["target"]["fingerprint"] == target.identity.fingerprint
    assert config["selection"]["users_selected"] == 10 and config["selection"]["users_total"] == 40
    assert config["metrics"] == report["methods"]["puma"]  # the artifact says how good it is on the test records
    _, src_prompts = source.read_all()
    with torch.no_grad():
        mapped = adapter(torch.from_numpy(src_prompts.copy())).numpy()
    np.testing.assert_allclose(mapped, prompts, rtol=1e-5, atol=1e-6)
    # the store's head is the one fitted with the adapter
    state, head_cfg = target.read_head()
    assert head_cfg == config["head"]
    for k, v in head.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- b. chain
def test_chained_migration(run_a, toy_paths, tmp_path):
    """A→B→C: the store migrated to llama is the source of llama → qwen2; the lineage nests."""
    report_a, _ = run_a
    cfg = _config(toy_paths, [{"store": report_a["store"], "model": {"name": "tiny:llama"}}], "tiny:qwen2",
                  baselines={"linear": False, "random_init": False})
    report = migration.run(cfg, str(tmp_path), log=_quiet)
    assert report["source"]["name"] == "tiny:llama" and report["target"]["name"] == "tiny:qwen2"
    assert report["source_training"] == {}  # nothing prepared: the source store existed
    assert set(report["methods"]) == {"puma", "source"}
    final = PromptStore.open(report["store"])
    ids, prompts = final.read_all()
    assert len(ids) == 40 and prompts.shape == (40, 1, 64)
    lineage = final.manifest.lineage
    assert lineage["kind"] == "migrated"
    assert lineage["sources"][0]["store"] == report_a["store"]
    assert lineage["sources"][0]["model"]["name"] == "tiny:llama"
    middle = lineage["sources"][0]["lineage"]
    assert middle["kind"] == "migrated" and middle["adapter"] == report_a["adapter"]
    assert middle["sources"][0]["lineage"]["kind"] == "trained"
    assert middle["sources"][0]["model"]["name"] == "tiny:stablelm"


# ---------------------------------------------------------------------------------------------- c. aggregated
def _aggregated(toy_paths, run_a, phi3_path, **extra):
    _, out_a = run_a
    return _config(toy_paths, [
        {"store": f"{out_a}/source-store", "model": {"name": "tiny:stablelm"}, "prepare": PREPARE},
        {"store": phi3_path, "model": {"name": "tiny:phi3"}, "prepare": PREPARE},
    ], "tiny:gemma3", **extra)


@pytest.fixture(scope="module")
def aggregated(run_a, toy_paths, tmp_path_factory):
    """[stablelm, phi3] → gemma3: stablelm's store is run_a's, phi3's is trained first. (report, phi3 store)"""
    phi3 = str(tmp_path_factory.mktemp("phi3") / "source-store")
    cfg = _aggregated(toy_paths, run_a, phi3, baselines={"linear": False, "random_init": False})
    return migration.run(cfg, str(tmp_path_factory.mktemp("aggregated")), log=_quiet), phi3


def test_aggregated_migration(run_a, aggregated):
    report, phi3_store = aggregated
    assert list(report["source_training"]) == [phi3_store]  # stablelm's existed already; phi3's was trained
    assert [s["name"] for s in report["sources"]] == ["tiny:stablelm", "tiny:phi3"]
    assert set(report["methods"]) == {"puma", "source", "source_1"}  # each source on its own model
    adapter, _, config = load_adapter(report["adapter"])
    assert adapter.source_dims == config["source_dims"] == [32, 80] and adapter.target_dim == 64
    assert [s["name"] for s in config["sources"]] == ["tiny:stablelm", "tiny:phi3"]
    target = PromptStore.open(report["store"])
    ids, prompts = target.read_all()
    assert len(ids) == 40 and prompts.shape == (40, 1, 64) and np.isfinite(prompts).all()
    assert target.identity.family == "gemma3_text"
    lineage = target.manifest.lineage
    assert [s["store"] for s in lineage["sources"]] == [f"{run_a[1]}/source-store", phi3_store]
    assert [s["lineage"]["kind"] for s in lineage["sources"]] == ["trained", "trained"]
    assert lineage["rejects"]["users"] == 0


def _store_without(path: str, copy_path: str, user: str) -> None:
    """A copy of the store at `path` lacking one user (same model, head, template)."""
    store = PromptStore.open(path)
    ids, prompts = store.read_all()
    keep = ids != user
    assert keep.sum() == len(ids) - 1
    state, head_cfg = store.read_head()
    m = store.manifest
    write_store(copy_path, m.identity, ids[keep], prompts[keep], state, head_cfg, template=m.template,
                task=m.task, lineage=m.lineage, shard_rows=16)


def test_aggregated_missing_user(run_a, aggregated, toy_paths, tmp_path):
    _, phi3_store = aggregated
    lacking = str(tmp_path / "phi3-lacking-u017")
    _store_without(phi3_store, lacking, "u017")

    # default policy: an error naming the user and the store, before any fitting
    cfg = _aggregated(toy_paths, run_a, lacking, baselines=NO_BASELINES)
    with pytest.raises(StoreError, match=rf"user 'u017' is missing from source store {lacking} \(1 user"):
        migration.run(cfg, str(tmp_path / "error"), log=_quiet)
    assert not (tmp_path / "error" / "target-store").exists()

    # "reject": completes without that user, and lists it in the rejects table with the reason
    cfg = _aggregated(toy_paths, run_a, lacking, baselines=NO_BASELINES, sources_missing_policy="reject")
    report = migration.run(cfg, str(tmp_path / "reject"), log=_quiet)
    reason = f"missing from source {lacking}"
    assert report["conversion"]["rejected"] == 1 and report["conversion"]["rejected_by_reason"] == {reason: 1}
    assert report["selection"]["users_total"] == 39 and report["data"]["users"] == 39
    target = PromptStore.open(report["store"])
    ids, _ = target.read_all()
    assert len(ids) == 39 and "u017" not in ids.tolist()
    rejects = target.manifest.lineage["rejects"]
    assert rejects["users"] == 1 and rejects["by_reason"] == {reason: 1}
    table = pq.read_table(f"{report['store']}/rejects/{rejects['files'][0]['name']}").to_pylist()
    assert table == [{"user_id": "u017", "reason": reason}]


def test_bad_missing_policy(toy_paths, tmp_path):
    with pytest.raises(ConfigError, match="sources_missing_policy"):
        _config(toy_paths, [{"store": str(tmp_path / "a")}, {"store": str(tmp_path / "b")}], "tiny:qwen2",
                sources_missing_policy="ignore")


# ---------------------------------------------------------------------------------------------- d. foreign stores
def test_adapter_refuses_store_of_another_model(run_a, tmp_path):
    report, out = run_a
    llama_store = report["store"]  # a store of tiny:llama; the adapter was fitted on tiny:stablelm prompts
    with pytest.raises(AdapterError) as err:
        convert(report["adapter"], [llama_store], str(tmp_path / "x"), log=_quiet)
    msg = str(err.value)
    assert "tiny:stablelm" in msg and "tiny:llama" in msg
    assert not (tmp_path / "x").exists()  # refused before writing anything
    source_store = PromptStore.open(f"{out}/source-store")
    # a source model with the right name but other weights is refused too: prompts are bound to weights
    with pytest.raises(StoreError, match="belongs to model tiny:stablelm"):
        source_store.check_model(load_backbone("tiny:stablelm", seed=1).identity)


def test_missing_source_store_without_prepare(toy_paths, tmp_path):
    cfg = _config(toy_paths, [{"store": str(tmp_path / "none"), "model": {"name": "tiny:llama"}}], "tiny:qwen2")
    with pytest.raises(StoreError, match=r"does not exist \(no manifest.json\) and sources\[\]\.prepare is not set"):
        migration.run(cfg, str(tmp_path / "out"), log=_quiet)


# ---------------------------------------------------------------------------------------------- e. the job
@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("migrate_job", REPO / "jobs" / "migrate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("override, key", [("selection.budgett=10", "budgett"), ("targets.name=x", "targets")])
def test_job_bad_config_key(job, tmp_path, capsys, override, key):
    rc = job.main(["--output", str(tmp_path / "run"), override])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error:") and f"unknown key(s) ['{key}']" in err
    assert not (tmp_path / "run").exists()


def test_job_bad_key_inside_a_source(job, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("sources:\n  - store: x\n    modle: {name: tiny:llama}\ntarget: {name: tiny:qwen2}\n")
    rc = job.main(["--config", str(config), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "sources[0]" in err and "unknown key(s) ['modle']" in err
