"""The sweep (jobs/sweep.py): Pareto front and recommendation on hand-made trials (ties, the CTR maximise
direction), its config checks and trial sizing without Ray, then a real 4-trial grid on a local Ray whose
recommended.yaml runs through jobs/migrate.py, and (slow) the Train-in-Tune path with 2 trials.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from puma_ray.config import ConfigError, from_dict
from puma_ray.recipes.migration import MigrateJobConfig
from puma_ray.recipes.runs import load_job_config
from puma_ray.recipes.sweep import (
    SearchConfig,
    SweepError,
    SweepJobConfig,
    build_report,
    dominates,
    pareto_front,
    recommend,
    recommended_header,
    recommended_migrate_config,
    reference_summary,
    within_tolerance,
)

REPO = Path(__file__).resolve().parents[1]


def _t(quality, passes, metric="rmse", **config):
    return {"config": {"strategy": "random", "k": 5, "budget": 10, "lr": 0.01, **config}, "quality": quality,
            "metric": metric, "cost": {"llm_record_passes": passes, "wall_s": 1.0}}


# ---------------------------------------------------------------------------------------------- Pareto + pick
def test_pareto_front_rmse():
    trials = [_t(1.00, 1000), _t(1.05, 500), _t(1.10, 400), _t(1.06, 600), _t(1.20, 400), _t(0.99, 2000)]
    front = pareto_front(trials)
    assert front == [2, 1, 0, 5]  # cheapest first; (1.06, 600) loses to (1.05, 500), (1.20, 400) to (1.10, 400)
    for i, t in enumerate(trials):
        dominated = any(dominates(o, t) for o in trials)
        assert (i in front) == (not dominated)


def test_pareto_front_ties():
    same = [_t(1.0, 100, strategy="a"), _t(1.0, 100, strategy="b")]  # identical objectives: neither dominates
    assert pareto_front(same) == [0, 1]
    assert recommend(same, 0.0) == 0  # the earlier one: deterministic
    cost_tie = [_t(1.1, 100), _t(1.0, 100)]  # same cost: the better quality dominates
    assert pareto_front(cost_tie) == [1]
    assert recommend(cost_tie, 0.5) == 1
    quality_tie = [_t(1.0, 300), _t(1.0, 100)]  # same quality: the cheaper dominates
    assert pareto_front(quality_tie) == [1]


def test_recommend_cheapest_within_tolerance():
    trials = [_t(1.00, 1000), _t(1.015, 600), _t(1.03, 300), _t(1.019, 700)]
    assert recommend(trials, 0.0) == 0
    assert recommend(trials, 0.02) == 1  # 1.015 <= 1.02; 1.03 is out
    assert recommend(trials, 0.05) == 2
    assert within_tolerance(1.02, 1.0, 0.02) and not within_tolerance(1.0201, 1.0, 0.02)


def test_ctr_maximises_auc():
    trials = [_t(0.80, 1000, "auc"), _t(0.79, 400, "auc"), _t(0.70, 100, "auc"), _t(0.81, 3000, "auc"),
              _t(0.78, 500, "auc")]
    assert pareto_front(trials, up=True) == [2, 1, 0, 3]  # (0.78, 500) is dominated by (0.79, 400)
    assert recommend(trials, 0.0, up=True) == 3  # the highest AUC
    assert recommend(trials, 0.025, up=True) == 1  # 0.79 >= 0.81 * 0.975
    report = build_report(trials, 0.025)
    assert report["maximize"] is True and report["metric"] == "auc"
    assert report["recommended"] is trials[1] and report["best_index"] == 3
    assert [t["quality"] for t in report["pareto"]] == [0.70, 0.79, 0.80, 0.81]


def test_report_stands_beside_the_reference_rows():
    reference = {"global_mean": {"rmse": 1.23, "mae": 1.0, "records": 9}, "user_mean": {"rmse": 1.17, "records": 9},
                 "bias": {"rmse": 1.00, "records": 9}}
    report = build_report([_t(1.05, 100), _t(1.04, 300)], 0.02, reference=reference)
    assert report["recommended_vs_reference"] == {"global_mean": {"rmse": 1.23, "beaten": True},
                                                  "user_mean": {"rmse": 1.17, "beaten": True},
                                                  "bias": {"rmse": 1.00, "beaten": False}}
    line = reference_summary(report)
    assert "global mean 1.2300, per-user mean 1.1700, user + item bias 1.0000" in line
    assert line.endswith("the recommended trial (1.0500) beats the per-user mean; it does not beat the user + item "
                         "bias (1.0000)")
    worse = build_report([_t(1.18, 100)], 0.02, reference=reference)
    assert "does NOT beat the per-user mean (1.1700)" in reference_summary(worse)
    best = build_report([_t(0.99, 100)], 0.02, reference=reference)
    assert reference_summary(best).endswith("beats the per-user mean; it beats the user + item bias")
    header = recommended_header(worse, "r.yaml").splitlines()
    assert len(header) == 3 and header[2].startswith("# reference rows") and "does NOT beat" in header[2]
    auc = build_report([_t(0.70, 100, "auc")], 0.02, reference={"user_mean": {"auc": 0.65, "uauc": 0.5}})
    assert auc["recommended_vs_reference"] == {"user_mean": {"auc": 0.65, "beaten": True}}  # higher is better
    assert "recommended_vs_reference" not in build_report([_t(1.0, 1)], 0.02) and not reference_summary(
        build_report([_t(1.0, 1)], 0.02))


def test_report_drops_failed_trials_and_keeps_the_contract():
    trials = [_t(1.0, 1000), _t(float("nan"), 10), _t(1.01, 500)]
    report = build_report(trials, 0.02, failed=[{"config": {"strategy": "x"}, "error": "boom"}])
    assert [t["quality"] for t in report["trials"]] == [1.0, 1.01]
    assert len(report["failed"]) == 2 and "not a finite number" in report["failed"][1]["error"]
    assert report["tolerance"] == 0.02 and report["recommended"]["quality"] == 1.01
    assert report["recommended"] in report["pareto"]
    for t in report["trials"]:
        assert set(t["config"]) == {"strategy", "k", "budget", "lr"} and t["metric"] == "rmse"
        assert isinstance(t["cost"]["llm_record_passes"], int) and isinstance(t["cost"]["wall_s"], float)
    json.dumps(report)
    with pytest.raises(SweepError, match="every trial failed"):
        build_report([_t(float("inf"), 1)], 0.02)


@pytest.mark.parametrize("up", [False, True])
def test_recommended_is_on_the_front_and_within_tolerance(up):
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        trials = [_t(float(np.round(rng.uniform(0.5, 1.5), 2)), int(rng.integers(1, 6)) * 100) for _ in range(n)]
        tol = float(rng.choice([0.0, 0.01, 0.05, 0.2]))
        rec = recommend(trials, tol, up)
        qualities = [t["quality"] for t in trials]
        best = max(qualities) if up else min(qualities)
        assert rec in pareto_front(trials, up)
        assert within_tolerance(trials[rec]["quality"], best, tol, up)
        ok = [t for t in trials if within_tolerance(t["quality"], best, tol, up)]
        assert trials[rec]["cost"]["llm_record_passes"] == min(t["cost"]["llm_record_passes"] for t in ok)


def test_recommended_config_pins_the_source_stores():
    migrate = {"sources": [{"store": "{output}/source-store", "model": {"name": "tiny:llama"}}],
               "target": {"name": "tiny:qwen2"}, "selection": {"k": 3, "valid_users": 4}}
    out = recommended_migrate_config(migrate, {"strategy": "random", "k": 7, "budget": 0.2, "lr": 0.003},
                                     ["runs/x/source-store"])
    assert migrate["selection"] == {"k": 3, "valid_users": 4}  # the input is untouched
    assert out["selection"] == {"k": 7, "valid_users": 4, "strategy": "random", "budget": 0.2}
    assert out["fit"] == {"lr": 0.003}
    assert out["sources"][0]["store"] == os.path.abspath("runs/x/source-store")
    cfg = from_dict(MigrateJobConfig, out, "recommended")
    assert (cfg.selection.strategy, cfg.selection.k, cfg.selection.budget, cfg.fit.lr) == ("random", 7, 0.2, 0.003)


# ---------------------------------------------------------------------------------------------- config + sizing
MIGRATE = {"sources": [{"store": "s"}], "target": {"name": "tiny:qwen2"}}


@pytest.mark.parametrize("search, message", [
    ({"kind": "random"}, "search.kind"),
    ({"strategies": ["kmeans_variance", "nope"]}, "unknown ['nope']"),
    ({"budgets": [1.5]}, "selection.budget 1.5"),
    ({"ks": [0]}, "search.ks"),
    ({"lrs": []}, "non-empty list"),
    ({"lrs": [-1]}, "search.lrs"),
    ({"tolerance": 1.5}, "search.tolerance"),
    ({"max_concurrent_trials": 0}, "max_concurrent_trials"),
    ({"stratgies": ["random"]}, "unknown key(s) ['stratgies']"),
    ({"adapters": ["mlp:0"]}, "adapter 'mlp:0'"),
    ({"adapters": ["linear:8"]}, "adapter 'linear:8'"),
    ({"adapters": ["transformer"]}, "kind must be"),
    ({"seeds": [0, 0]}, "search.seeds"),
])
def test_search_config_errors(search, message):
    with pytest.raises(ConfigError) as e:
        from_dict(SweepJobConfig, {"migrate": MIGRATE, "search": search}, "cfg")
    assert message in str(e.value)


def test_migrate_section_is_checked_strictly():
    with pytest.raises(ConfigError, match="migrate: the migration"):
        from_dict(SweepJobConfig, {"search": {}}, "cfg")
    with pytest.raises(ConfigError, match=r"migrate.selection: unknown key\(s\) \['budgett'\]"):
        from_dict(SweepJobConfig, {"migrate": {**MIGRATE, "selection": {"budgett": 3}}}, "cfg")
    cfg = from_dict(SweepJobConfig, {"migrate": MIGRATE, "search": {"budgets": [10, 0.5]}}, "cfg")
    assert isinstance(cfg.job, MigrateJobConfig) and cfg.search.grid_size() == 2 * 1 * 2 * 1


def test_shipped_sweep_config_loads():
    cfg = load_job_config(SweepJobConfig, str(REPO / "configs" / "sweep_ml100k_tiny.yaml"))
    assert cfg.job.engine.kind == "ray" and cfg.search.grid_size() == 8


def _sizing(engine: dict, search: dict | None = None):
    return from_dict(SweepJobConfig, {"migrate": {**MIGRATE, "engine": engine}, "search": search or {}}, "cfg")


def test_trial_resources_leave_room_for_train_workers():
    from puma_ray.recipes.sweep_on_tune import trial_resources
    two = {"CPU": 2.0}
    assert trial_resources(_sizing({"kind": "local"}), two) == ({"cpu": 1.0}, 2)
    assert trial_resources(_sizing({"kind": "local"}, {"max_concurrent_trials": 1}), two) == ({"cpu": 1.0}, 1)
    # a trial's process (0.1) + its Train worker (0.9): two fit on 2 CPUs; with 1.0 per worker only one does
    assert trial_resources(_sizing({"kind": "ray", "cpus_per_worker": 0.9}), two) == ({"cpu": 0.1}, 2)
    assert trial_resources(_sizing({"kind": "ray", "cpus_per_worker": 1.0}), two) == ({"cpu": 0.1}, 1)
    gpus = {"CPU": 96.0, "GPU": 8.0}
    assert trial_resources(_sizing({"kind": "ray", "num_workers": 4, "use_gpu": True}), gpus)[1] == 2
    with pytest.raises(SweepError, match="one trial needs 2.1 CPU"):
        trial_resources(_sizing({"kind": "ray", "num_workers": 2}), two)


def test_search_space_kinds():
    from ray import tune

    from puma_ray.ray_layer.tune import search_algorithm, search_space
    grid = search_space(SearchConfig(strategies=["random", "kmeans_pca"], budgets=[5, 0.5]))
    assert grid["strategy"] == tune.grid_search(["random", "kmeans_pca"])
    assert grid["budget"] == tune.grid_search([5, 0.5])
    assert search_algorithm(SearchConfig(), {"quality": "min", "llm_record_passes": "min"}) is None
    space = search_space(SearchConfig(kind="optuna", lrs=[0.01, 0.001]))
    assert space["lr"].lower == 0.001 and space["lr"].upper == 0.01
    assert search_space(SearchConfig(kind="optuna", lrs=[0.01]))["lr"] == 0.01
    algo = search_algorithm(SearchConfig(kind="optuna"), {"quality": "max", "llm_record_passes": "min"})
    assert algo.metric == ["quality", "llm_record_passes"] and algo.mode == ["max", "min"]


def test_core_module_imports_no_ray():
    code = "import sys, puma_ray.recipes.sweep; sys.exit(1 if 'ray' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@pytest.fixture(scope="module")
def toy_paths(toy_dataset, tmp_path_factory):
    from puma_ray.data import save_dataset
    return save_dataset(toy_dataset, str(tmp_path_factory.mktemp("sweep_data")))


def _config_dict(toy_paths: dict, engine: dict, search: dict) -> dict:
    return {
        "migrate": {
            "sources": [{"store": "{output}/source-store", "model": {"name": "tiny:llama"},
                         "prepare": {"epochs": 2, "batch_size": 32, "patience": 1, "lr": 0.02}}],
            "target": {"name": "tiny:qwen2"},
            "data": {"name": "parquet", "paths": toy_paths},
            "selection": {"k": 4, "valid_users": 4},
            "fit": {"epochs": 1, "batch_size": 32, "patience": 1},
            "baselines": {"linear": False, "random_init": False},
            "store": {"shard_rows": 16},
            "engine": engine,
        },
        "search": search,
    }


def test_trial_in_process(toy_paths, toy_dataset, tmp_path, one_torch_thread):
    """The shared context once, then trials without Ray: reproducible in one process (a reused Tune actor),
    scored on every user's validation records, charged the features their strategy reads."""
    from puma_ray.recipes.sweep import check_feasible, prepare_context, run_trial
    cfg = from_dict(SweepJobConfig, _config_dict(toy_paths, {"kind": "local"},
                                                 {"strategies": ["kmeans_variance", "loss_bucketing"]}), "cfg")
    ctx = prepare_context(cfg.job, cfg.search.strategies, str(tmp_path), log=lambda m: None)
    assert ctx.inputs.variance is not None and ctx.inputs.loss is not None and ctx.inputs.ffn is None
    assert set(ctx.feature_costs) == {"loss"} and ctx.source_training  # the source store was trained here
    setting = {"strategy": "kmeans_variance", "k": 4, "budget": 8, "lr": 0.01}
    a, b = (run_trial(ctx, cfg.job, setting, log=lambda m: None) for _ in range(2))
    assert a["quality"] == b["quality"] and a["cost"]["llm_record_passes"] == b["cost"]["llm_record_passes"]
    assert a["valid_metrics"]["records"] == toy_dataset.summary()["records"]["valid"]
    assert a["users_selected"] == 8 and a["validation_users"] == 4
    loss = run_trial(ctx, cfg.job, {**setting, "strategy": "loss_bucketing"}, log=lambda m: None)
    # variance is computed from labels (no LLM pass): a kmeans_variance trial pays its fit only; a loss_bucketing
    # trial pays its fit plus the source model's pass over the sampled records that ranks users by loss
    fit_passes = a["cost"]["forward_records"] + a["cost"]["backward_records"]
    assert a["cost"]["llm_record_passes"] == fit_passes
    feature = ctx.feature_costs["loss"].llm_record_passes
    assert feature > 0 and loss["cost"]["llm_record_passes"] > feature
    assert loss["cost"]["backward_records"] == loss["train_records"]  # 1 epoch: the fit's own passes are apart
    for bad, message in ((SearchConfig(budgets=[41]), "41 users"), (SearchConfig(ks=[50]), "K=50")):
        with pytest.raises(SweepError, match=message):
            check_feasible(bad, ctx)


# ---------------------------------------------------------------------------------------------- the job, end to end
@pytest.fixture(scope="module")
def sweep_job(load_job):
    return load_job("sweep")


def test_job_config_error_is_one_message(sweep_job, tmp_path, capsys):
    rc = sweep_job.main(["--output", str(tmp_path / "run"), "search.strategies=[nope]"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "nope" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def _write_config(path: Path, toy_paths: dict, engine: dict, search: dict) -> Path:
    path.write_text(yaml.safe_dump(_config_dict(toy_paths, engine, search)))
    return path


def _check_report(out: Path, n_trials: int, tolerance: float, dataset=None) -> dict:
    report = json.loads((out / "report.json").read_text())
    trials = report["trials"]
    assert len(trials) == n_trials and not report["failed"]
    assert report["tolerance"] == tolerance and report["metric"] == "rmse" and report["maximize"] is False
    for t in trials:
        assert math.isfinite(t["quality"]) and 0 < t["quality"] < 4 and t["metric"] == "rmse"
        assert t["cost"]["llm_record_passes"] > 0 and t["cost"]["wall_s"] > 0
        assert t["valid_metrics"]["records"] == report["data"]["records"]["valid"]  # every user's valid records
    # the reference rows (no LLM) on the same validation records the trials are scored on, in both reports
    assert set(report["reference"]) == {"global_mean", "user_mean", "bias"}
    assert all(m["records"] == report["data"]["records"]["valid"] for m in report["reference"].values())
    if dataset is not None:  # exactly the predictors fitted on the train split, scored on the valid split
        from puma_ray.training.reference import reference_metrics
        expected = reference_metrics("rating", dataset.split("train"), dataset.split("valid"))
        assert report["reference"].keys() == expected.keys()
        for name, m in expected.items():
            assert report["reference"][name] == pytest.approx(m, rel=1e-9), name
    vs = report["recommended_vs_reference"]
    assert {n: v["rmse"] for n, v in vs.items()} == {n: m["rmse"] for n, m in report["reference"].items()}
    assert vs["user_mean"]["beaten"] == (report["recommended"]["quality"] < report["reference"]["user_mean"]["rmse"])
    md = (out / "report.md").read_text()
    assert "user + item bias (no LLM)" in md and "the per-user mean" in md
    assert f"| recommended trial | {report['recommended']['valid_metrics']['rmse']:.4f}" in md.replace("**", "")
    assert "per-user mean" in (out / "recommended.yaml").read_text().splitlines()[2]

    # the front, recomputed by hand: exactly the undominated trials
    def dominated(t):
        return any(o["quality"] <= t["quality"] and o["cost"]["llm_record_passes"] <= t["cost"]["llm_record_passes"]
                   and (o["quality"] < t["quality"] or o["cost"]["llm_record_passes"] < t["cost"]["llm_record_passes"])
                   for o in trials)
    assert sorted(report["pareto_indices"]) == [i for i, t in enumerate(trials) if not dominated(t)]
    assert report["pareto"] == [trials[i] for i in report["pareto_indices"]]
    rec = report["recommended"]
    best = min(t["quality"] for t in trials)
    assert rec in report["pareto"]
    assert rec["quality"] <= best * (1 + tolerance)
    within = [t for t in trials if t["quality"] <= best * (1 + tolerance)]
    assert rec["cost"]["llm_record_passes"] == min(t["cost"]["llm_record_passes"] for t in within)
    return report


def _run_recommended(out: Path, tmp_path: Path, report: dict) -> dict:
    """recommended.yaml through jobs/migrate.py, as a user would run it."""
    rec_yaml = out / "recommended.yaml"
    first = rec_yaml.read_text().splitlines()[0]
    assert first == f"# python jobs/migrate.py --config {rec_yaml}"
    migrate_out = tmp_path / "migrate"
    proc = subprocess.run([sys.executable, "jobs/migrate.py", "--config", str(rec_yaml), "--output", str(migrate_out)],
                          cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mig = json.loads((migrate_out / "report.json").read_text())
    c = report["recommended"]["config"]
    assert (mig["selection"]["strategy"], mig["selection"]["k"], mig["selection"]["budget"]) == \
        (c["strategy"], c["k"], c["budget"])
    assert mig["source_training"] == {}, "the sweep's source store is reused, not trained again"
    assert math.isfinite(mig["methods"]["puma"]["rmse"])
    assert set(mig["reference"]) == {"global_mean", "user_mean", "bias"}
    assert "user + item bias (no LLM)" in (migrate_out / "report.md").read_text()
    return mig


def test_grid_sweep_end_to_end(local_ray, sweep_job, toy_paths, toy_dataset, tmp_path, capsys):
    """8 trials (2 strategies x 2 budgets x 2 adapters: the MLP at width 16 and the linear map), fits in the trial
    processes, 2 at a time on 2 CPUs."""
    config = _write_config(tmp_path / "sweep.yaml", toy_paths, {"kind": "local"},
                           {"kind": "grid", "strategies": ["kmeans_variance", "random"], "ks": [4], "budgets": [8, 16],
                            "lrs": [0.01], "adapters": ["mlp:16", "linear"], "tolerance": 0.02})
    out = tmp_path / "sweep"
    start = time.perf_counter()
    assert sweep_job.main(["--config", str(config), "--output", str(out)]) == 0
    wall = time.perf_counter() - start
    console = capsys.readouterr().out
    report = _check_report(out, 8, 0.02, toy_dataset)
    assert reference_summary(report) in console.splitlines()  # the console stands beside the reference rows too
    assert report["concurrent_trials"] == 2 and report["trial_resources"] == {"cpu": 1.0}
    settings = {(t["config"]["strategy"], t["config"]["budget"], t["config"]["adapter"]) for t in report["trials"]}
    assert settings == {(s, b, a) for s in ("kmeans_variance", "random") for b in (8, 16) for a in ("mlp:16", "linear")}
    by_budget = {}
    for t in report["trials"]:  # cost follows the budget: twice the users, about twice the passes
        by_budget.setdefault(t["config"]["budget"], set()).add(t["users_selected"])
    assert by_budget == {8: {8}, 16: {16}}
    # the same selection and fit seed: the adapter is the only difference, and it changes the validation figure
    pair = {t["config"]["adapter"]: t for t in report["trials"] if t["config"]["strategy"] == "random"
            and t["config"]["budget"] == 8}
    assert pair["mlp:16"]["train_records"] == pair["linear"]["train_records"]
    assert pair["mlp:16"]["quality"] != pair["linear"]["quality"]
    md = (out / "report.md").read_text()
    assert "Pareto" in md and "recommended" in md and "| linear |" in md
    mig = _run_recommended(out, tmp_path, report)
    rec = yaml.safe_load((out / "recommended.yaml").read_text())
    assert rec["adapter"]["kind"] == report["recommended"]["config"]["adapter"].split(":")[0]
    assert mig["provenance"]["config"]["adapter"]["kind"] == rec["adapter"]["kind"]
    print(f"sweep wall {wall:.1f}s")


# the grid sweep end to end stays in the default run
@pytest.mark.slow
def test_optuna_sweep(local_ray, sweep_job, toy_paths, tmp_path):
    """Multi-objective Optuna through Tune: 3 sampled trials, lr drawn log-uniformly within the listed range."""
    config = _write_config(tmp_path / "sweep.yaml", toy_paths, {"kind": "local"},
                           {"kind": "optuna", "strategies": ["kmeans_variance", "random"], "ks": [4],
                            "budgets": [8, 16], "lrs": [0.003, 0.03], "num_samples": 3, "tolerance": 0.05, "seed": 1})
    out = tmp_path / "sweep"
    assert sweep_job.main(["--config", str(config), "--output", str(out)]) == 0
    report = _check_report(out, 3, 0.05)
    assert report["search"]["kind"] == "optuna"
    for t in report["trials"]:
        assert 0.003 <= t["config"]["lr"] <= 0.03 and t["config"]["budget"] in (8, 16)
    rec = yaml.safe_load((out / "recommended.yaml").read_text())
    assert rec["fit"]["lr"] == report["recommended"]["config"]["lr"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_in_tune_sweep(local_ray, sweep_job, toy_paths, tmp_path):
    """engine ray: every trial's fit is a Ray Train + DeepSpeed run started inside the Tune trial; 2 trials at a
    time (0.1 CPU per trial process + 0.9 per Train worker), and no placement group left behind."""
    from ray.util import placement_group_table
    config = _write_config(tmp_path / "sweep.yaml", toy_paths,
                           {"kind": "ray", "num_workers": 1, "cpus_per_worker": 0.9, "zero_stage": 2},
                           {"kind": "grid", "strategies": ["kmeans_variance", "random"], "ks": [4], "budgets": [8],
                            "lrs": [0.01], "tolerance": 0.02, "driver_cpus": 0.1})
    out = tmp_path / "sweep"
    assert sweep_job.main(["--config", str(config), "--output", str(out)]) == 0
    report = _check_report(out, 2, 0.02)
    assert report["engine"] == "ray" and report["concurrent_trials"] == 2
    runs = sorted(p.name for p in (out / "train").iterdir())
    # one Train run per trial, each in its own <run>-puma-<identity> folder
    assert len(runs) == 2 and all(re.fullmatch(r".+-puma-[0-9a-f]{12}", r) for r in runs), runs
    for t in report["trials"]:
        assert t["epochs"] == 1 and t["cost"]["backward_records"] == t["train_records"]
    live = [pg for pg in placement_group_table().values() if pg["state"] == "CREATED"]
    assert not live, live


def test_adapter_specs_round_trip():
    from puma_ray.models.adapter import AdapterConfig, adapter_spec, parse_adapter_spec
    for spec in ("mlp", "mlp:32", "mlp_skip", "mlp_skip:8", "linear"):
        assert adapter_spec(AdapterConfig(**parse_adapter_spec(spec))) == spec


def test_trial_config_sets_adapter_and_seed():
    from puma_ray.recipes.sweep import trial_config
    job = from_dict(SweepJobConfig, {"migrate": MIGRATE}, "cfg").job
    setting = {"strategy": "random", "k": 3, "budget": 5, "lr": 0.003, "adapter": "mlp_skip:24", "seed": 2}
    cfg = trial_config(job, setting)
    assert (cfg.adapter.kind, cfg.adapter.hidden, cfg.adapter.dropout) == ("mlp_skip", 24, job.adapter.dropout)
    assert cfg.selection.seed == 2 and cfg.fit.seed == 2
    same = trial_config(job, {**setting, "adapter": None, "seed": None})
    assert same.adapter == job.adapter and same.selection.seed == job.selection.seed
    search = {"adapters": ["mlp", "linear"], "seeds": [0, 1, 2]}
    assert from_dict(SweepJobConfig, {"migrate": MIGRATE, "search": search}, "cfg").search.grid_size() == 2 * 2 * 3


def test_several_seeds_recommend_on_each_settings_mean():
    """Two adapters over 3 seeds: the front and the pick are over the settings' means (with their spread), not
    over single draws; one lucky seed of the worse setting does not win."""
    lucky = [_t(q, 100, adapter="mlp", seed=s) for s, q in enumerate([0.95, 1.10, 1.10])]  # mean 1.05
    steady = [_t(q, 100, adapter="linear", seed=s) for s, q in enumerate([1.00, 1.01, 1.02])]  # mean 1.01
    report = build_report(lucky + steady, 0.0)
    assert len(report["trials"]) == 6 and len(report["settings"]) == 2
    rec = report["recommended"]
    assert rec["config"]["adapter"] == "linear" and "seed" not in rec["config"]
    assert rec["quality"] == pytest.approx(1.01) and rec["quality_sd"] == pytest.approx(0.01)
    assert rec["seeds"] == [0, 1, 2] and rec["per_seed"] == [1.00, 1.01, 1.02]
    assert rec["cost"]["llm_record_passes"] == 100
    assert min(t["quality"] for t in report["trials"]) == 0.95  # the single best draw was the other setting's
    from puma_ray.reports.markdown import sweep_markdown
    md = sweep_markdown(report)
    assert "1.0100 ± 0.0100 (3 seeds)" in md and "6 trials (2 settings)" in md
    header = recommended_header(report, "r.yaml").splitlines()[1]
    assert "adapter linear: validation rmse 1.0100 ± 0.0100 over seeds [0, 1, 2] at 100 LLM record passes" in header
