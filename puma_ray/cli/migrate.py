"""Migrate every user's soft prompt from the source model(s) to a new target model with PUMA.

    python jobs/migrate.py [--config configs/X.yaml] [--output DIR] [key=value ...]

With no config it runs configs/migrate_default.yaml: MovieLens-100K, two small foundation models pretrained on its
train split (a Llama-family source, its store trained first → a wider Qwen2-family target), PUMA on 10% of the
users, beside the baselines, full retraining and the LLM-free reference rows; minutes on 2 cores.
Writes the target store, the adapter and report.json under --output (default: a new folder under runs/).
"""
from __future__ import annotations

from puma_ray.artifacts.lock import OutputLock
from puma_ray.config import from_dict
from puma_ray.recipes.engine import migration_executor
from puma_ray.recipes.jobs import JOBS
from puma_ray.recipes.migration import STAGES, format_report, resolve_foundations, run
from puma_ray.recipes.migration.plan import format_plan, plan_migration
from puma_ray.recipes.migration.runner import check_stage_names
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


def migrate(config, output: str | None = None) -> dict:
    """The migrate job from Python (a notebook): `config` is a MigrateJobConfig, a dict of its fields or a YAML
    path; writes what the job writes (target store, adapter, report.json, report.md) under `output` (default: a
    new folder under runs/) and returns the report. Wrong input raises a PumaError (the job prints it as one line)."""
    if isinstance(config, str):
        cfg = JOB.load(config)
    elif isinstance(config, dict):
        cfg = from_dict(JOB.config_cls(), config, "migrate config")
    else:
        cfg = config
    return _run(cfg, new_run_dir(output, "migrate"))[0]


def _run(cfg, output: str, only: list[str] | None = None, skip: list[str] = ()) -> tuple[dict | None, str | None]:
    """(report, report.md's path) of one migration into `output` ((None, None) when `only` stops before the
    report). One migration per output at a time: a second is refused with one line naming the holder."""
    set_threads(cfg.threads)
    check_stage_names(STAGES, only, skip)  # before foundations are pretrained or Ray starts
    with OutputLock(output, "a migration", cfg.storage):
        cfg = resolve_foundations(cfg)  # before the Ray layer: its Train workers load the pretrained folders
        # the executor before Ray starts: a setting the Ray executor cannot honour is one line
        report = run(cfg, output, executor=migration_executor(cfg, output), only=only, skip=skip)
        if report is None:
            return None, None
        write_report(report_path(output), "migrate", report, cfg.storage)
        return report, write_migration_report(report, output, cfg.storage)


def _stage_list(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _flags(parser) -> None:
    names = ", ".join(s.name for s in STAGES)
    parser.add_argument("--stages", help="run only these stages (comma-separated), the ones before them reused "
                        f"from the run ledger of --output (they must have finished there); stages: {names}")
    parser.add_argument("--plan", action="store_true",
                        help="print the stages, their users, records, LLM record passes, FLOPs, wall and memory "
                        "(measured rates of this machine), and exit: nothing is trained or written")
    parser.add_argument("--skip", help="leave these stages out (comma-separated): "
                        + ", ".join(s.name for s in STAGES if s.skipped is not None))


def main(argv=None) -> int:
    args = job_args(argv, __doc__, "configs/", "selection.budget=200", JOB.default_config,
                    JOB.config_cls(), more_flags=_flags)

    def body() -> int:
        cfg = JOB.load(args.config, args.overrides)
        if args.print_config:
            return print_config(cfg)
        if args.plan:
            set_threads(cfg.threads)
            print(format_plan(plan_migration(cfg, args.output or "runs/<new>")))
            return 0
        output = new_run_dir(args.output, "migrate")
        print(f"library and Ray messages: {library_logs_to_file(output, 'migrate')}")
        report, report_md = _run(cfg, output, _stage_list(args.stages) or None, _stage_list(args.skip))
        if report is None:
            print(f"stages {args.stages} done in {output}; the report is written by a run that reaches it")
            return 0
        print(format_report(report))
        print(f"report: {report_path(output)} ({report_md})\ntarget store: {report['store']}\n"
              f"adapter: {report['adapter']}")
        return 0

    return user_errors_to_exit_code(body)


def console() -> None:
    """The installed `puma-migrate` command (pyproject.toml [project.scripts]): main, then exit_job's safe exit."""
    exit_job(main())


if __name__ == "__main__":
    console()
