"""Repair (or polish) a finished migration: Eq. 1 on the target from each user's migrated prompt, for the users
its gate flagged worse (within a budget) or for every user, into a new verified store version.

    python jobs/repair.py run=<migration run folder> [mode=polish] [max_users=N] [max_record_passes=N] [--output DIR]

Reads the run's report.json, gate/users.parquet and target store; writes under --output (default: <run>/<mode>)
the patch store (the trained users), the new store version (`store`, verify with jobs/convert.py --verify), the
re-gated table gate/users.parquet and report.json.
"""
from __future__ import annotations

from puma_ray.recipes.jobs import JOBS
from puma_ray.recipes.repair import default_output, format_repair, run
from puma_ray.recipes.runs import (
    exit_job,
    job_args,
    library_logs_to_file,
    print_config,
    report_path,
    set_threads,
    user_errors_to_exit_code,
    write_report,
)

JOB = JOBS["repair"]


def main(argv=None) -> int:
    args = job_args(argv, __doc__, "configs/", "run=runs/default-demo", JOB.default_config, JOB.config_cls())

    def body() -> int:
        cfg = JOB.load(args.config, args.overrides)
        if args.print_config:
            return print_config(cfg)
        from puma_ray.recipes.repair import read_run
        read_run(cfg)  # bad input is one line before the output folder is made
        output = args.output or default_output(cfg)
        set_threads(cfg.threads)
        print(f"library messages: {library_logs_to_file(output, 'repair')}")
        report = run(cfg, output)
        write_report(report_path(output), "repair", report, cfg.storage)
        print(format_repair(report))
        print(f"report: {report_path(output)}\nnew store version: {report['store']}")
        return 0

    return user_errors_to_exit_code(body)


def console() -> None:
    """The installed `puma-repair` command (pyproject.toml [project.scripts]): main, then exit_job's safe exit."""
    exit_job(main())


if __name__ == "__main__":
    console()
