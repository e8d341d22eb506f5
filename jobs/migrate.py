"""Migrate every user's soft prompt from the source model(s) to a new target model with PUMA.

    python jobs/migrate.py [--config configs/X.yaml] [--output DIR] [key=value ...]

With no config it runs the embedded default below: MovieLens-100K, two small foundation models pretrained on its
train split (a Llama-family source, its store trained first → a wider Qwen2-family target), PUMA on 10% of the
users, beside the baselines, full retraining and the LLM-free reference rows; minutes on 2 cores.
Writes the target store, the adapter and report.json under --output (default: a new folder under runs/).
"""
from __future__ import annotations

import sys

from puma_ray.adapter import AdapterError
from puma_ray.config import ConfigError
from puma_ray.data import DataError
from puma_ray.migration import MigrateJobConfig, format_report, resolve_foundations, run
from puma_ray.report_md import write_migration_report
from puma_ray.runs import exit_job, job_args, load_job_config, new_run_dir, report_path, set_threads, write_json
from puma_ray.selection import SelectionError
from puma_ray.store import StoreError

# The embedded default: every number sized so the whole pipeline, the first pretraining of both foundations
# included, ends within about 8 minutes on 2 CPU cores (a rerun reuses the cached foundations).
# Two small foundation models that know MovieLens (docs/benchmarks.md): pretrained on the train split only, of
# different families, widths and seeds, as an old and a new LLM generation are; then frozen.
SOURCE_MODEL = {"name": "foundation:llama", "seed": 0, "foundation": {"hidden_size": 64}}
TARGET_MODEL = {"name": "foundation:qwen2", "seed": 1, "foundation": {"hidden_size": 96}}  # another width: 64 → 96
# source system and full retraining alike (Eq. 1 on the frozen foundation): 3 epochs of 40k sampled records, the
# benchmark's schedule (valid RMSE was still falling after 3 x 25k: docs/benchmarks.md)
_PROMPTS = {"epochs": 3, "patience": 1, "batch_size": 128, "lr": 0.02, "max_train_records": 40_000}
DEFAULT_CONFIG = {
    "sources": [{"store": "{output}/source-store", "model": SOURCE_MODEL, "prepare": _PROMPTS}],
    "target": TARGET_MODEL,
    "data": {"name": "movielens100k"},
    "selection": {"strategy": "kmeans_variance", "k": 15, "budget": 0.1, "valid_users": 0.1},
    "fit": {"epochs": 4, "batch_size": 64, "lr": 0.01, "patience": 1},
    "baselines": {"full_retrain": True, "full_retrain_train": _PROMPTS, "fits_on": "local"},
    "store": {"shard_rows": 256},
    "convert": {"runs_on": "local"},  # 943 users: converted in this process in < 1 s, before a pool would start
    "engine": {"kind": "ray", "num_workers": 1, "zero_stage": 2},  # a local Ray, started in-process
}


def _engine_functions(cfg: MigrateJobConfig, output: str) -> dict:
    """engine.kind "ray": fits on Ray Train + DeepSpeed, per-user statistics by Ray Data aggregation, conversion
    on a Ray Data actor pool (a local Ray unless an address is known); "local": the library's defaults, here."""
    if cfg.engine.kind == "local":
        return {}
    import os

    from puma_ray.fs import join
    from puma_ray.ray_layer import ensure_ray, make_ray_fit, make_variance_fn, run_on_ray
    ensure_ray(cfg.engine.address, cfg.engine.local_cpus)
    storage_path = cfg.engine.storage_path or join(output, "train")
    name = cfg.engine.run_name or os.path.basename(output.rstrip("/"))
    records = cfg.data.paths.get("records") if cfg.data.name == "parquet" else None
    return {"fit_fn": make_ray_fit(cfg.engine, cfg.target, storage_path, cfg.storage, run_name=name),
            "variance_fn": make_variance_fn(records, cfg.storage), "convert_runner": run_on_ray}


def main(argv=None) -> int:
    args = job_args(argv, __doc__, "configs/", "selection.budget=200")
    try:
        cfg = load_job_config(MigrateJobConfig, args.config, args.overrides, default=DEFAULT_CONFIG)
        set_threads(cfg.threads)
        output = new_run_dir(args.output, "migrate")
        cfg = resolve_foundations(cfg)  # before the Ray layer: its Train workers load the pretrained folders
        report = run(cfg, output, **_engine_functions(cfg, output))
        write_json(report_path(output), report, cfg.storage)
        report_md = write_migration_report(report, output, cfg.storage)
    except (ConfigError, DataError, StoreError, AdapterError, SelectionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"report: {report_path(output)} ({report_md})\ntarget store: {report['store']}\nadapter: {report['adapter']}")
    return 0


if __name__ == "__main__":
    exit_job(main())
