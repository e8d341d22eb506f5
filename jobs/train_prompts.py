"""Train every user's soft prompt on one frozen model and write its personalization store (Eq. 1).

    python jobs/train_prompts.py [--config configs/X.yaml] [--output DIR] [key=value ...]

With no config it runs configs/train_prompts_ml100k_foundation.yaml (MovieLens-100K on the demo's small Llama-family
foundation, pretrained and cached by the first run of any job).

It is how a source system is made, and the full-retraining baseline of a migration. Prints test RMSE/MAE (or
AUC/uAUC) beside the reference predictors and writes report.json + the store under --output.
"""
from __future__ import annotations

from puma_ray.recipes.jobs import JOBS
from puma_ray.recipes.runs import (
    exit_job,
    job_args,
    library_logs_to_file,
    new_run_dir,
    print_config,
    report_path,
    set_threads,
    user_errors_to_exit_code,
    write_report,
)
from puma_ray.recipes.train_prompts import run

JOB = JOBS["train_prompts"]


def main(argv=None) -> int:
    args = job_args(argv, __doc__, "configs/train_prompts_*.yaml", "train.epochs=3", JOB.default_config,
                    JOB.config_cls())

    def body() -> int:
        cfg = JOB.load(args.config, args.overrides)
        if args.print_config:
            return print_config(cfg)
        set_threads(cfg.threads)
        output = new_run_dir(args.output, "train_prompts")
        print(f"library and Ray messages: {library_logs_to_file(output, 'train_prompts')}")
        report = run(cfg, output)
        write_report(report_path(output), "train_prompts", report, cfg.storage)
        print(f"report: {report_path(output)}\nstore: {report['store']}")
        return 0

    return user_errors_to_exit_code(body)


if __name__ == "__main__":
    exit_job(main())
