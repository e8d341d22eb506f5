"""Reproduce the paper's experiments (Tables 2-4, Figures 3-6) from one config.

    python jobs/benchmark.py --config configs/benchmark_ml100k_small.yaml [--output DIR] [key=value ...]

Trains each model family's store once, runs every migration the config's experiments need (memoised: a rerun
into the same --output reuses finished runs), and writes benchmark.json + benchmark.md (tables and PNGs) under
--output, with each migration's own report under runs/<name>/.
"""
from __future__ import annotations

import os
import shlex
import sys

from puma_ray.adapter import AdapterError
from puma_ray.benchmark import Benchmark, BenchmarkJobConfig, write_benchmark
from puma_ray.config import ConfigError
from puma_ray.data import DataError
from puma_ray.runs import exit_job, job_args, load_job_config, new_run_dir, set_threads
from puma_ray.selection import SelectionError
from puma_ray.store import StoreError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from migrate import _engine_functions  # noqa: E402  (the same engine choice as jobs/migrate.py: local or Ray)


JOB_ERRORS = (ConfigError, DataError, StoreError, AdapterError, SelectionError, FileNotFoundError)


def run_benchmark(config: str, output: str | None, overrides: list[str], command: str) -> tuple[str, float]:
    """Runs the benchmark; benchmark.md is rewritten after each experiment. Returns (benchmark.md, wall seconds)."""
    cfg = load_job_config(BenchmarkJobConfig, config, overrides)
    bench = Benchmark(cfg, new_run_dir(output, "benchmark"), engine=_engine_functions)
    set_threads(bench.base.threads)
    storage = bench.base.storage

    def write(result: dict) -> str:
        return write_benchmark({**result, "command": command}, bench.output, storage, command)

    result = bench.run(on_progress=write)
    return write(result), result["wall_s"]


def main(argv=None) -> int:
    args = job_args(argv, __doc__, "configs/benchmark_*.yaml", "experiments.chain=null", config_required=True)
    words = ["python", "jobs/benchmark.py", *(sys.argv[1:] if argv is None else argv)]
    try:
        md, wall_s = run_benchmark(args.config, args.output, args.overrides, " ".join(map(shlex.quote, words)))
    except JOB_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"benchmark: {md} ({wall_s / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    exit_job(main())
