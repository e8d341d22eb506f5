"""Find the cheapest migration setting that keeps quality: a Ray Tune sweep over selection strategy, K, budget and lr.

    python jobs/sweep.py [--config configs/X.yaml] [--output DIR] [key=value ...]

Each trial selects users, fits the adapter (a Ray Train run with engine.kind "ray", in the trial with "local") and
scores it on the validation records of every user; objectives: validation RMSE (AUC for CTR) and LLM record passes.
Writes into --output: report.json (every trial, the Pareto front, the recommendation), report.md, and
recommended.yaml: the cheapest setting within search.tolerance of the best, as a jobs/migrate.py config. The
LLM-free reference rows (global mean, per-user mean, user + item bias; fitted on the train split) are scored on the
same validation records and printed beside the recommendation, with whether it beats the per-user mean.
With no config it runs configs/sweep_default.yaml (the demo's foundations; ~15 minutes on 2 cores).
"""
from __future__ import annotations

from puma_ray.recipes.jobs import JOBS
from puma_ray.recipes.runs import (
    exit_job,
    job_args,
    library_logs_to_file,
    new_run_dir,
    print_config,
    set_threads,
    user_errors_to_exit_code,
)
from puma_ray.recipes.sweep import reference_summary, write_outputs

JOB = JOBS["sweep"]


def main(argv=None) -> int:
    args = job_args(argv, __doc__, "configs/sweep_*.yaml", "search.budgets=[20,50]", JOB.default_config,
                    JOB.config_cls())

    def body() -> int:
        cfg = JOB.load(args.config, args.overrides)
        if args.print_config:
            return print_config(cfg)
        set_threads(cfg.job.threads)
        output = new_run_dir(args.output, "sweep")
        print(f"library and Ray messages: {library_logs_to_file(output, 'sweep')}")
        from puma_ray.recipes.sweep_on_tune import run_sweep
        report = run_sweep(cfg, output)
        paths = write_outputs(report, cfg.migrate, output, cfg.job.storage)
        rec = report["recommended"]
        print(f"{len(report['trials'])} trials ({len(report['failed'])} failed), {len(report['pareto'])} on the "
              f"Pareto front; recommended {rec['config']}: validation {report['metric']} {rec['quality']:.4f}, "
              f"{rec['cost']['llm_record_passes']:,.0f} LLM record passes")
        if reference_summary(report):
            print(reference_summary(report))
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
        return 0

    return user_errors_to_exit_code(body)


if __name__ == "__main__":
    exit_job(main())
