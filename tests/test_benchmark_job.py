"""jobs/benchmark.py end to end on the toy dataset (40 users, 1 epoch each): every experiment of the paper in one
small run (~60 s on 2 cores), memoised runs, chain and aggregation wiring, benchmark.md with valid PNGs; config
errors without running anything."""
from __future__ import annotations

import json
import math
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from test_report_md import check_links

from puma_ray.config import ConfigError, from_dict
from puma_ray.data import save_dataset
from puma_ray.recipes.benchmark import BenchmarkJobConfig
from puma_ray.recipes.run_memo import run_key
from puma_ray.recipes.runs import load_job_config

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "benchmark.py"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # main() sets torch threads; this restores them after

_PROMPTS = {"epochs": 1, "patience": 0, "batch_size": 64, "lr": 0.02}


def tiny_config(paths: dict) -> dict:
    return {
        "families": {"llama": {"name": "tiny:llama"}, "qwen2": {"name": "tiny:qwen2"},
                     "gemma3": {"name": "tiny:gemma3"}},
        "source": "llama", "target": "qwen2", "prepare": _PROMPTS,
        "migrate": {"data": {"name": "parquet", "paths": {"records": paths["records"], "items": paths["items"]}},
                    "selection": {"strategy": "kmeans_variance", "k": 3, "budget": 8, "valid_users": 5},
                    "fit": {"epochs": 1, "batch_size": 64, "lr": 0.01, "patience": 0},
                    "store": {"shard_rows": 16}, "engine": {"kind": "local"}, "threads": 1},
        "experiments": {"main": True, "strategies": ["random", "kmeans_variance"], "random_multiple": 2,
                        "random_budgets": [4, 8], "cross_family": ["llama", "qwen2"],
                        "chain": ["llama", "qwen2", "gemma3"],
                        "aggregation": {"sources": ["llama", "gemma3"], "target": "qwen2"},
                        "seeds": [0, 1], "shared_prompt": True, "table2_all_users": True},
    }


@pytest.fixture(scope="module")
def job():
    """The job script's namespace (jobs/ is not a package): job.main(argv) runs it in this process."""
    return SimpleNamespace(**runpy.run_path(str(JOB), run_name="benchmark_job"))


@pytest.fixture(scope="module")
def config_file(toy_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(save_dataset(toy_dataset, str(folder / "data")))))
    return path


def test_benchmark_job(job, config_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench"
    rc = job.main(["--config", str(config_file), "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"benchmark: {out / 'benchmark.md'}" in captured.out

    result = json.loads((out / "benchmark.json").read_text())
    assert {"table2", "table4", "figure3", "figure4", "figure5", "figure6", "machine", "command"} <= set(result)
    t2 = result["table2"]
    assert set(t2["methods"]) == {"puma", "linear", "random_init", "source", "full_retrain", "shipped"}
    assert all(math.isfinite(m["rmse"]) for m in t2["methods"].values())
    assert t2["cost_ratio_full_retrain_over_puma"]["llm_record_passes"] > 0
    # two seeds (selection + fit): mean ± sd per method; full retraining and the source do not depend on them
    assert t2["seeds"] == [0, 1] and t2["n"]["puma"] == 2 and t2["n"]["full_retrain"] == 1
    runs = [t2["per_seed"][k]["puma"]["rmse"] for k in ("0", "1")]
    assert t2["methods"]["puma"]["rmse"] == pytest.approx(sum(runs) / 2)
    assert t2["spread"]["puma"]["rmse"] == pytest.approx(abs(runs[0] - runs[1]) / 2 ** 0.5)
    assert runs[0] != runs[1], "seed 1 must select and fit differently"
    seed1 = json.loads((out / "runs" / "main-llama-to-qwen2-s1" / "report.json").read_text())
    assert seed1["provenance"]["config"]["selection"]["seed"] == 1 and seed1["provenance"]["config"]["fit"]["seed"] == 1
    assert set(t2["reference"]) == {"global_mean", "user_mean", "bias"}
    # the shared-prompt control beside each family's store
    assert {"llama/shared", "qwen2/shared"} <= set(result["stores"])
    # full retraining on the target = the target family's store (same training): the same test RMSE
    assert t2["methods"]["full_retrain"]["rmse"] == pytest.approx(result["stores"]["qwen2"]["methods"]["rmse"])

    # the shipped adapter per seed: chosen on validation among PUMA and the linear map, its test row beside them
    for seed, row in t2["shipped"].items():
        assert row["adapter"] in {"puma", "linear"} and set(row["validation"]) == {"puma", "linear"}
        assert t2["per_seed"][seed]["shipped"] == t2["per_seed"][seed][row["adapter"]]
        best = min(row["validation"], key=row["validation"].get)
        assert row["adapter"] == best
    assert t2["n"]["shipped"] == 2

    # Table 2 in the paper's protocol: every user fitted on, every user's valid records for early stopping
    ta = result["table2_all_users"]
    assert set(ta["methods"]) == {"puma_all_users", "source", "puma_budget", "full_retrain"}
    assert ta["users"] == 40 and ta["validation_users"] == 40 and ta["budget_users"] == 8
    assert ta["n"]["puma_all_users"] == 2
    everyone = json.loads((out / "runs" / "all-users-llama-to-qwen2-s1" / "report.json").read_text())
    assert everyone["selection"]["users_selected"] == 40 and everyone["provenance"]["config"]["fit"]["seed"] == 1
    assert ta["methods"]["puma_budget"] == t2["methods"]["puma"], "the budget row must be Table 2's own runs"
    assert ta["methods"]["full_retrain"]["rmse"] == pytest.approx(t2["methods"]["full_retrain"]["rmse"])
    assert ta["cost"]["puma"]["llm_record_passes"] > t2["cost"]["puma"]["llm_record_passes"]

    rows = {r["label"]: r for r in result["table4"]}
    # the variance-quintile spectrum, recomputed from the source store: the very sets the runs fitted on
    for label in ("Random", "K-Means + Variance Stratification (PUMA)", "Random (2x budget)"):
        assert rows[label]["matches_run"] == [True, True], label
        assert all(sum(c) == rows[label]["users"] for c in rows[label]["quintiles"])
    puma_row = rows["K-Means + Variance Stratification (PUMA)"]
    assert puma_row["metrics"] == t2["methods"]["puma"], "Table 4's PUMA row must be Table 2's run"
    assert rows["Random (2x budget)"]["users"] == 16 and rows["Random"]["users"] == 8
    assert all(r["n"] == 2 and len(r["per_seed"]) == 2 for r in result["table4"])
    assert [p["users"] for p in result["figure3"]["random"]] == [4, 8]
    assert result["figure3"]["random"][1]["value"] == rows["Random"]["per_seed"][0]["rmse"]  # memoised, not rerun

    cells = {(c["source"], c["target"]): c for c in result["figure4"]["cells"]}
    assert set(cells) == {("llama", "qwen2"), ("qwen2", "llama")}
    c = cells[("qwen2", "llama")]
    assert c["gain"] == pytest.approx(c["retrained"] / c["migrated"])
    # every figure over the config's two seeds: the mean of two real runs, their spread beside it
    assert result["figure4"]["seeds"] == [0, 1] and len(c["per_seed"]) == 2
    assert c["migrated"] == pytest.approx(sum(c["per_seed"]) / 2) and c["migrated_sd"] > 0
    seed1 = json.loads((out / "runs" / "qwen2-to-llama-kmeans_variance-b8-s1" / "report.json").read_text())
    assert seed1["methods"]["puma"]["rmse"] == c["per_seed"][1] and seed1["provenance"]["config"]["fit"]["seed"] == 1

    steps = result["figure5"]["steps"]
    assert [s["model"] for s in steps] == ["llama", "qwen2", "gemma3"]
    assert steps[1]["run"] == "main-llama-to-qwen2"
    step2 = json.loads((out / "runs" / steps[2]["run"] / "report.json").read_text())
    assert step2["provenance"]["config"]["sources"][0]["store"] == steps[1]["store"], \
        "a chain step must start from the previous step's migrated store"
    assert step2["source"]["family"] == "qwen2" and step2["target"]["family"].startswith("gemma3")

    assert len(steps[2]["per_seed"]) == 2 and steps[2]["migrated"] == pytest.approx(sum(steps[2]["per_seed"]) / 2)
    chain_s1 = json.loads((out / "runs" / (steps[2]["run"] + "-s1") / "report.json").read_text())
    assert chain_s1["provenance"]["config"]["sources"][0]["store"].endswith("-s1/target-store"), \
        "seed 1's chain must start from seed 1's previous step"

    bars = result["figure6"]["bars"]
    assert list(bars) == ["llama alone", "gemma3 alone", "llama + gemma3"]
    assert all(len(v) == 2 for v in result["figure6"]["per_seed"].values())
    assert set(result["figure6"]["bars_sd"]) == set(bars)
    agg = json.loads((out / "runs" / "llama+gemma3-to-qwen2-kmeans_variance-b8" / "report.json").read_text())
    assert [s["name"] for s in agg["sources"]] == ["tiny:llama", "tiny:gemma3"]

    md = (out / "benchmark.md").read_text()
    for title in ("Table 2", "Table 3", "Table 4", "Figure 3", "Figure 4", "Figure 5", "Figure 6"):
        assert f"## {title}" in md
    assert " ± " in md and "user + item bias (no LLM)" in md and "llama/shared" in md
    assert "PUMA vs linear map: RMSE gap" in md and "### The shipped adapter" in md and "init corr." in md
    assert "## Table 2 in the paper's protocol" in md and "PUMA fitted on every user" in md and "| Q1 |" in md
    assert "full retraining / PUMA = " in md
    assert check_links(md, lambda n: (out / n).read_bytes()) == {
        "table2.png", "figure3.png", "figure4.png", "figure5.png", "figure6.png"}
    assert (out / "runs" / "main-llama-to-qwen2" / "report.md").is_file()
    assert not (out / "runs" / "llama-to-qwen2-kmeans_variance-b8").exists()

    # a rerun into the same folder reuses every store and finished run: nothing is trained again, also when the
    # folder is named relative to the working directory (with a trailing slash) and the thread count differs
    # one run as an older version wrote it: made before `baselines.candidates` existed (its config lacks the
    # field, its key is that config's): the field's default is what it ran with, so it is reused as well
    old = out / "runs" / "main-llama-to-qwen2-s1" / "report.json"
    report = json.loads(old.read_text())
    del report["provenance"]["config"]["baselines"]["candidates"]
    report["benchmark_key"] = run_key(report["provenance"]["config"], str(out))
    old.write_text(json.dumps(report))
    runs_before = {p.name: p.stat().st_mtime for p in (out / "runs").glob("*/report.json")}
    monkeypatch.chdir(tmp_path)
    assert job.main(["--config", str(config_file), "--output", "bench/", "migrate.threads=1"]) == 0
    log = capsys.readouterr().out
    assert "[run " not in log and "[store " not in log
    assert {p.name: p.stat().st_mtime for p in (out / "runs").glob("*/report.json")} == runs_before

    # a store trained with other Eq. 1 settings is never reused as if it were this config's
    assert job.main(["--config", str(config_file), "--output", str(out), "prepare.init_scale=0.1"]) != 0
    assert "init_scale" in capsys.readouterr().err


def test_benchmark_config_errors(toy_dataset, tmp_path):
    base = tiny_config({"records": "r", "items": "i"})
    with pytest.raises(ConfigError, match="phi3"):
        from_dict(BenchmarkJobConfig, {**base, "experiments": {"chain": ["llama", "phi3"]}}, "benchmark")
    with pytest.raises(ConfigError, match="migrate.target"):
        from_dict(BenchmarkJobConfig, {**base, "migrate": {**base["migrate"], "target": {"name": "tiny:qwen2"}}},
                  "benchmark")
    with pytest.raises(ConfigError, match="unknown strategy"):
        from_dict(BenchmarkJobConfig, {**base, "experiments": {"strategies": ["nope"]}}, "benchmark")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**base, "migrate": {**base["migrate"], "fit": {"epoch": 1}}}))
    with pytest.raises(ConfigError, match="epoch"):
        load_job_config(BenchmarkJobConfig, str(path))


def test_run_key_ignores_execution_and_never_holds_a_secret():
    """The memo key: threads and storage (endpoint, credentials) do not make another run, the output folder is
    written as {output}, a report holding the pre-hash JSON key is keyed the same way, and no credential is in it."""
    from puma_ray.recipes.run_memo import recorded_key, run_key
    config = {"sources": [{"store": "/runs/b/stores/llama"}], "fit": {"lr": 0.003}, "threads": 1,
              "storage": {"endpoint_url": "http://127.0.0.1:9", "key": "AKIAEXAMPLE", "secret": "hunter2-secret"}}
    key = run_key(config, "/runs/b")
    assert key.startswith("sha256:") and "hunter2" not in key and "AKIA" not in key
    assert run_key({**config, "threads": None, "storage": {}}, "/runs/b") == key
    moved = {**config, "sources": [{"store": "/elsewhere/stores/llama"}]}
    assert run_key(moved, "/elsewhere") == key and run_key(moved, "/runs/b") != key
    assert run_key({**config, "fit": {"lr": 0.01}}, "/runs/b") != key
    legacy = {"benchmark_key": json.dumps(config, sort_keys=True)}
    assert recorded_key(legacy, "/runs/b") == key and recorded_key({"benchmark_key": "{bad"}, "/runs/b") is None
