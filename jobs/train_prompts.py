"""Train every user's soft prompt on one frozen model and write its personalization store (Eq. 1).

    python jobs/train_prompts.py --config configs/train_prompts_ml100k_tiny.yaml [--output DIR] [key=value ...]

It is how a source system is made, and the full-retraining baseline of a migration. Prints test RMSE/MAE (or
AUC/uAUC) beside the reference predictors and writes report.json + the store under --output.
"""
from __future__ import annotations

import sys

from puma_ray.config import ConfigError
from puma_ray.data import DataError
from puma_ray.runs import exit_job, job_args, load_job_config, new_run_dir, report_path, set_threads, write_json
from puma_ray.store import StoreError
from puma_ray.train_store import TrainPromptsJobConfig, run


def main(argv=None) -> int:
    args = job_args(argv, __doc__, "configs/", "train.epochs=3")
    try:
        cfg = load_job_config(TrainPromptsJobConfig, args.config, args.overrides)
        set_threads(cfg.threads)
        output = new_run_dir(args.output, "train_prompts")
        report = run(cfg, output)
        write_json(report_path(output), report, cfg.storage)
    except (ConfigError, DataError, StoreError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {report_path(output)}\nstore: {report['store']}")
    return 0


if __name__ == "__main__":
    exit_job(main())
