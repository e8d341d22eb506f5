"""Find the cheapest migration setting that keeps quality: a Ray Tune sweep over selection strategy, K, budget and lr.

    python jobs/sweep.py [--config configs/X.yaml] [--output DIR] [key=value ...]

Each trial selects users, fits the adapter (a Ray Train run with engine.kind "ray", in the trial with "local") and
scores it on the validation records of every user; objectives: validation RMSE (AUC for CTR) and LLM record passes.
Writes into --output: report.json (every trial, the Pareto front, the recommendation), report.md, and
recommended.yaml: the cheapest setting within search.tolerance of the best, as a jobs/migrate.py config.
With no config it runs the embedded default below (minutes on 2 cores).
"""
from __future__ import annotations

import sys

from puma_ray.adapter import AdapterError
from puma_ray.config import ConfigError
from puma_ray.data import DataError
from puma_ray.runs import exit_job, job_args, load_job_config, new_run_dir, set_threads
from puma_ray.selection import SelectionError
from puma_ray.store import StoreError
from puma_ray.sweep import SweepError, SweepJobConfig, write_outputs

# The embedded default: 150 MovieLens-100K users, a tiny Llama source (its store trained first) → a tiny Qwen2
# target; 2 strategies x 2 budgets = 4 trials of one local fit each.
DEFAULT_CONFIG = {
    "migrate": {
        "sources": [{"store": "{output}/source-store", "model": {"name": "tiny:llama"},
                     "prepare": {"epochs": 2, "patience": 1, "batch_size": 128, "lr": 0.02}}],
        "target": {"name": "tiny:qwen2"},
        "data": {"name": "movielens100k", "max_users": 150},
        "selection": {"k": 5, "valid_users": 15},
        "fit": {"epochs": 2, "batch_size": 64, "patience": 1},
        "engine": {"kind": "local"},
    },
    "search": {"kind": "grid", "strategies": ["kmeans_variance", "random"], "ks": [5], "budgets": [15, 45],
               "lrs": [0.01], "tolerance": 0.02},
}


def main(argv=None) -> int:
    args = job_args(argv, __doc__, "configs/sweep_*.yaml", "search.budgets=[20,50]")
    try:
        cfg = load_job_config(SweepJobConfig, args.config, args.overrides, default=DEFAULT_CONFIG)
        set_threads(cfg.job.threads)
        output = new_run_dir(args.output, "sweep")
        from puma_ray.ray_layer import run_sweep
        report = run_sweep(cfg, output)
        paths = write_outputs(report, cfg.migrate, output, cfg.job.storage)
    except (ConfigError, DataError, StoreError, AdapterError, SelectionError, SweepError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rec = report["recommended"]
    print(f"{len(report['trials'])} trials ({len(report['failed'])} failed), {len(report['pareto'])} on the Pareto "
          f"front; recommended {rec['config']}: validation {report['metric']} {rec['quality']:.4f}, "
          f"{rec['cost']['llm_record_passes']:,} LLM record passes")
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    exit_job(main())
