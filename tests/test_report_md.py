"""report.md and its PNGs: migrate reports (rating, ctr; with and without full retraining), sweep reports, the
benchmark plot helpers, and a report written to a real S3 endpoint on loopback. No model, no Ray: fast."""
from __future__ import annotations

import copy
import io
import re

import pytest

import puma_ray.reports.markdown as report_md
from puma_ray.fs import StorageOptions, filesystem

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(metric: str, values: list[float]) -> list[dict]:
    return [{"epoch": e, "train_loss": 1.3 - 0.05 * e, f"valid_{metric}": v, "wall_s": 2.5, "workers": 1}
            for e, v in enumerate(values)]


def make_report(task: str = "rating", full_retrain: bool = True) -> dict:
    """A migrate report.json as jobs/migrate.py writes it, by hand (same keys, made-up numbers)."""
    model = lambda name, family, d: {"name": name, "family": family, "hidden_size": d,  # noqa: E731
                                     "fingerprint": "ab" * 32, "revision": None, "num_layers": 2, "num_params": 140016}
    if task == "rating":
        methods = {"puma": {"rmse": 1.2134, "mae": 0.9785}, "linear": {"rmse": 1.2064, "mae": 0.9609},
                   "random_init": {"rmse": 1.2420, "mae": 1.0260}, "source": {"rmse": 1.1870, "mae": 0.9658}}
        full, metric, hist = {"rmse": 1.1829, "mae": 0.9547}, "rmse", [1.25, 1.22, 1.21, 1.215]
    else:
        methods = {"puma": {"auc": 0.6546, "uauc": 0.6552}, "linear": {"auc": 0.6012, "uauc": 0.6100},
                   "random_init": {"auc": 0.4917, "uauc": 0.4883}, "source": {"auc": 0.5742, "uauc": 0.5312}}
        full, metric, hist = {"auc": 0.5778, "uauc": 0.5289}, "auc", [0.55, 0.61, 0.65, 0.64]
    cost = {"puma": {"wall_s": 52.2, "llm_record_passes": 51282, "flops": 1.03e12, "convert_wall_s": 0.4},
            "linear": {"wall_s": 26.0, "llm_record_passes": 51282, "flops": 1.03e12},
            "random_init": {"wall_s": 15.9, "llm_record_passes": 68376, "flops": 1.38e12}}
    report = {
        "task": task, "source": model("tiny:llama", "llama", 48), "sources": [model("tiny:llama", "llama", 48)],
        "target": model("tiny:qwen2", "qwen2", 64),
        "selection": {"strategy": "kmeans_variance", "k": 15, "budget": 94, "users_selected": 94, "users_total": 943,
                      "validation_users": 94},
        "methods": methods, "cost": cost, "primary_metric": metric,
        "store": "RUN/target-store", "adapter": "RUN/adapter",
        "conversion": {"users": 943, "wall_s": 0.41, "rows_per_s": 2300.5, "shards": 4},
        "fits": {"puma": {"history": _history(metric, hist), "best_epoch": 2}},
        "data": {"name": "movielens100k", "task": task, "users": 943, "items": 1682,
                 "records": {"train": 80024, "valid": 9988, "test": 9988}},
        "wall_s": 295.3, "provenance": {"package": "puma_ray 0.1.0", "torch": "2.13.0", "host": "h",
                                        "created_at": "2026-11-28T00:00:00+00:00"},
    }
    if full_retrain:
        report["methods"]["full_retrain"] = full
        report["cost"]["full_retrain"] = {"wall_s": 79.1, "llm_record_passes": 179964, "flops": 3.63e12}
        report["cost_ratio_full_retrain_over_puma"] = {"wall_s": 79.1 / 52.2, "llm_record_passes": 179964 / 51282,
                                                       "flops": 3.63e12 / 1.03e12}
    return report


def assert_png(data: bytes) -> None:
    from PIL import Image
    assert data[:8] == PNG_MAGIC
    image = Image.open(io.BytesIO(data))
    image.verify()
    w, h = Image.open(io.BytesIO(data)).size
    assert 300 <= w <= 2000 and 200 <= h <= 2000, (w, h)


def linked_files(md: str) -> set[str]:
    return set(re.findall(r"\]\(([\w.-]+\.png)\)", md))


def check_links(md: str, read) -> set[str]:
    pngs = linked_files(md)
    for name in pngs:
        assert_png(read(name))
    return pngs


def _table_row(md: str, label: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"| {label} |"))


@pytest.mark.parametrize("task", ["rating", "ctr"])
@pytest.mark.parametrize("full", [True, False], ids=["full_retrain", "no_full_retrain"])
def test_migration_report(tmp_path, task, full):
    report = make_report(task, full)
    run = str(tmp_path / "run")
    report["store"], report["adapter"] = f"{run}/target-store", f"{run}/adapter"
    path = report_md.write_migration_report(report, run)
    assert path == f"{run}/report.md"
    md = open(path).read()

    cols = report_md.get_task(task).metrics
    assert f"| method | {cols[0].upper()} {'↓' if task == 'rating' else '↑'} |" in md
    for name, metrics in report["methods"].items():
        row = _table_row(md, report_md.method_label(name))
        for c in cols:
            assert f"{metrics[c]:.4f}" in row, (name, c, row)
    best = {"rating": "source" if not full else "full_retrain", "ctr": "puma"}[task]
    assert f"**{report['methods'][best][cols[0]]:.4f}**" in _table_row(md, report_md.method_label(best))
    assert md.count("**") // 2 >= 2  # at least one best per metric column

    assert "| PUMA | 52.2 | 0.0 | 51,282 | 1.03e+12 |" in md
    assert ("Full retraining / PUMA" in md) == full
    if full:
        assert "| full retraining | 79.1 | 0.0 | 179,964 | 3.63e+12 |" in md
        assert "LLM record passes **3.5x**" in md
    assert "| users | 943 |" in md and "| rows_per_s | 2,300.5 |" in md
    assert "tiny:llama" in md and "tiny:qwen2" in md and "kmeans_variance" in md and "94 of 943" in md
    assert "[`" + report["store"] + "`](target-store/)" in md
    assert "[`" + report["adapter"] + "`](adapter/)" in md

    pngs = check_links(md, lambda n: (tmp_path / "run" / n).read_bytes())
    assert pngs == {"metrics.png", "puma_fit.png"}


def test_migration_report_without_history_or_cost(tmp_path):
    report = make_report()
    report["fits"] = {}
    del report["cost"], report["conversion"]
    md = open(report_md.write_migration_report(report, str(tmp_path))).read()
    assert linked_files(md) == {"metrics.png"}
    assert "## Cost" not in md


def make_sweep() -> dict:
    trials = []
    for i, (strategy, budget, lr, q, passes) in enumerate([
            ("random", 50, 1e-3, 1.25, 20_000), ("random", 100, 1e-3, 1.22, 40_000),
            ("random", 200, 1e-3, 1.20, 80_000), ("kmeans_variance", 50, 1e-3, 1.23, 21_000),
            ("kmeans_variance", 100, 1e-3, 1.205, 41_000), ("kmeans_variance", 100, 1e-2, 1.26, 41_000)]):
        trials.append({"config": {"strategy": strategy, "k": 15, "budget": budget, "lr": lr}, "quality": q,
                       "metric": "rmse", "cost": {"llm_record_passes": passes, "wall_s": 10.0 + i}})
    return {"trials": trials, "pareto": [0, 3, 4, 2], "recommended": trials[4], "tolerance": 0.01}


def test_sweep_report(tmp_path):
    report = make_sweep()
    md = open(report_md.write_sweep_report(report, str(tmp_path))).read()
    rows = [line for line in md.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 6
    assert rows[0].startswith("| 1 | random | 15 | 200 |") and "Pareto" in rows[0]
    assert rows[1].startswith("| 2 | kmeans_variance | 15 | 100 | 0.001 | the config's | 1.2050 | 41,000 | 14.0 |")
    assert "**recommended**" in rows[1]
    assert rows[-1].startswith("| 6 | kmeans_variance | 15 | 100 | 0.01 | the config's | 1.2600 |")
    assert "Pareto" not in rows[-1]
    assert "Recommended" in md and "1.2050 at 41,000 LLM record passes" in md
    assert check_links(md, lambda n: (tmp_path / n).read_bytes()) == {"pareto.png", "quality_vs_budget.png"}
    # the front given as trial dicts instead of indices reads the same
    as_dicts = copy.deepcopy(report)
    as_dicts["pareto"] = [report["trials"][i] for i in report["pareto"]]
    assert report_md.sweep_markdown(as_dicts) == report_md.sweep_markdown(report)


def test_quality_by_budget_keeps_the_best_per_point():
    series = report_md.quality_by_budget(make_sweep()["trials"], lower=True)
    assert series == {"kmeans_variance": [(50.0, 1.23), (100.0, 1.205)],
                      "random": [(50.0, 1.25), (100.0, 1.22), (200.0, 1.20)]}


def test_benchmark_plot_helpers():
    assert_png(report_md.plot_quality_vs_budget({"random": [(50, 1.25), (100, 1.22), (300, 1.19)]}, "rmse",
                                                {"full retraining": 1.19, "PUMA at 50": 1.21}))
    fam = ["llama", "qwen2", "gemma3"]
    gains = {s: {t: 1.0 + 0.01 * (i - j) for j, t in enumerate(fam) if t != s} for i, s in enumerate(fam)}
    assert_png(report_md.plot_gain_heatmap(fam, gains))
    assert_png(report_md.plot_chain([{"model": "llama", "migrated": 1.19, "retrained": 1.19},
                                     {"model": "qwen2", "migrated": 1.20, "retrained": 1.21},
                                     {"model": "gemma3", "migrated": 1.21, "retrained": None}], "rmse"))
    assert_png(report_md.plot_bars({"llama alone": 1.21, "qwen2 alone": 1.22, "llama + qwen2": 1.20}, "rmse",
                                   "Aggregated migration", "source prompts", {"full retraining": 1.19}))
    assert_png(report_md.plot_metric_bars({"puma": {"auc": 0.6}, "source": {"auc": 0.55}}, ("auc",), "AUC"))


def test_fmt_and_tables():
    assert report_md.fmt(None) == "–" and report_md.fmt(float("nan")) == "–"
    assert report_md.fmt(1234567) == "1,234,567" and report_md.fmt(3.63e12) == "3.63e+12"
    assert report_md.fmt(1.23456) == "1.2346" and report_md.fmt(True) == "yes"
    assert report_md.method_label("source_1") == "source model 2"
    assert report_md.ordered_methods(["source", "x", "puma"]) == ["puma", "source", "x"]


def test_migration_report_on_s3(s3_server):
    storage = StorageOptions(endpoint_url=s3_server["endpoint_url"], key=s3_server["key"], secret=s3_server["secret"])
    out = f"s3://{s3_server['bucket']}/runs/report-md"
    report = make_report("ctr")
    report["store"], report["adapter"] = f"{out}/target-store", f"{out}/adapter"
    path = report_md.write_migration_report(report, out, storage)
    assert path == f"{out}/report.md"
    fs, root = filesystem(out, storage)
    md = fs.cat_file(f"{root}/report.md").decode()
    assert "| PUMA | **0.6546** | **0.6552** |" in md
    assert f"`{out}/target-store`" in md  # remote paths are shown, not linked relatively
    assert check_links(md, lambda n: fs.cat_file(f"{root}/{n}")) == {"metrics.png", "puma_fit.png"}


def test_migrate_job_writes_report_md(toy_dataset, tmp_path, capsys, one_torch_thread):
    """jobs/migrate.py writes report.md (and its PNGs) beside report.json and prints where."""
    import importlib.util
    from pathlib import Path

    import yaml

    from puma_ray.data import save_dataset
    script = Path(__file__).resolve().parents[1] / "jobs" / "migrate.py"
    spec = importlib.util.spec_from_file_location("migrate_job", script)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    paths = save_dataset(toy_dataset, str(tmp_path / "data"))
    config = tmp_path / "migrate.yaml"
    config.write_text(yaml.safe_dump({
        "sources": [{"store": "{output}/source-store", "model": {"name": "tiny:llama"},
                     "prepare": {"epochs": 1, "patience": 0, "batch_size": 64}}],
        "target": {"name": "tiny:qwen2"}, "data": {"name": "parquet", "paths": paths},
        "selection": {"budget": 8, "k": 3, "valid_users": 4}, "fit": {"epochs": 2, "batch_size": 64},
        "baselines": {"linear": False, "random_init": False}, "store": {"shard_rows": 16},
        "engine": {"kind": "local"}, "threads": 1}))
    out = tmp_path / "run"
    assert job.main(["--config", str(config), "--output", str(out)]) == 0
    assert f"({out / 'report.md'})" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "| PUMA |" in md and "| source model |" in md and "## Per-user gate" in md
    assert check_links(md, lambda n: (out / n).read_bytes()) == {"metrics.png", "puma_fit.png", "gate.png"}
