"""Reproduce the paper's experiments (Tables 2-4, Figures 3-6) from one config.

    python jobs/benchmark.py --config configs/benchmark_ml100k_small.yaml [--output DIR] [key=value ...]

Trains each model family's store once, runs every migration the config's experiments need (memoised: a rerun
into the same --output reuses finished runs), and writes benchmark.json + benchmark.md (tables and PNGs) under
--output, with each migration's own report under runs/<name>/.
"""
from __future__ import annotations

import shlex
import sys

from puma_ray.recipes.benchmark import Benchmark
from puma_ray.recipes.engine import migration_executor
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
from puma_ray.reports.benchmark import write_benchmark

JOB = JOBS["benchmark"]


def run_benchmark(config: str, output: str | None, overrides: list[str], command: str) -> tuple[str, float]:
    """Runs the benchmark; benchmark.md is rewritten after each experiment. Returns (benchmark.md, wall seconds)."""
    cfg = JOB.load(config, overrides)
    bench = Benchmark(cfg, new_run_dir(output, "benchmark"), engine=migration_executor)
    print(f"library and Ray messages: {library_logs_to_file(bench.output, 'benchmark')}")
    set_threads(bench.base.threads)
    storage = bench.base.storage

    def write(result: dict) -> str:
        return write_benchmark({**result, "command": command}, bench.output, storage, command)

    result = bench.run(on_progress=write)
    return write(result), result["wall_s"]


def main(argv=None) -> int:
    args = job_args(argv, __doc__, "configs/benchmark_*.yaml", "experiments.chain=null", JOB.default_config,
                    JOB.config_cls())
    words = ["python", "jobs/benchmark.py", *(sys.argv[1:] if argv is None else argv)]

    def body() -> int:
        if args.print_config:
            return print_config(JOB.load(args.config, args.overrides))
        md, wall_s = run_benchmark(args.config, args.output, args.overrides, " ".join(map(shlex.quote, words)))
        print(f"benchmark: {md} ({wall_s / 60:.1f} min)")
        return 0

    return user_errors_to_exit_code(body)


if __name__ == "__main__":
    exit_job(main())
