"""Migrate every user's soft prompt from the source model(s) to a new target model with PUMA.

    python jobs/migrate.py [--config configs/X.yaml] [--output DIR] [key=value ...]

With no config it runs configs/migrate_default.yaml: MovieLens-100K, two small foundation models pretrained on its
train split (a Llama-family source, its store trained first → a wider Qwen2-family target), PUMA on 10% of the
users, beside the baselines, full retraining and the LLM-free reference rows; minutes on 2 cores.
Writes the target store, the adapter and report.json under --output (default: a new folder under runs/).
"""
from __future__ import annotations

from puma_ray.recipes.engine import engine_functions, migration_runner
from puma_ray.recipes.jobs import JOBS
from puma_ray.recipes.migrate import format_report, resolve_foundations
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
from puma_ray.reports.markdown import write_migration_report

JOB = JOBS["migrate"]


def main(argv=None) -> int:
    args = job_args(argv, __doc__, "configs/", "selection.budget=200", JOB.default_config,
                    JOB.config_cls())

    def body() -> int:
        cfg = JOB.load(args.config, args.overrides)
        if args.print_config:
            return print_config(cfg)
        set_threads(cfg.threads)
        output = new_run_dir(args.output, "migrate")
        print(f"library and Ray messages: {library_logs_to_file(output, 'migrate')}")
        cfg = resolve_foundations(cfg)  # before the Ray layer: its Train workers load the pretrained folders
        run = migration_runner(cfg)  # before Ray starts: a setting the lean driver cannot honour is one line
        report = run(cfg, output, **engine_functions(cfg, output))
        write_report(report_path(output), "migrate", report, cfg.storage)
        report_md = write_migration_report(report, output, cfg.storage)
        print(format_report(report))
        print(f"report: {report_path(output)} ({report_md})\ntarget store: {report['store']}\n"
              f"adapter: {report['adapter']}")
        return 0

    return user_errors_to_exit_code(body)


if __name__ == "__main__":
    exit_job(main())
