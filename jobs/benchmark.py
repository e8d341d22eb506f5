"""Reproduce the paper's experiments (Tables 2-4, Figures 3-6) from one config.

    python jobs/benchmark.py --config configs/benchmark_ml100k_small.yaml [--output DIR] [key=value ...]

Trains each model family's store once, runs every migration the config's experiments need (memoised: a rerun
into the same --output reuses finished runs), and writes benchmark.json + benchmark.md (tables and PNGs) under
--output, with each migration's own report under runs/<name>/.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from puma_ray.adapter import AdapterError
from puma_ray.benchmark import Benchmark, BenchmarkJobConfig, write_benchmark
from puma_ray.config import ConfigError
from puma_ray.data import DataError
from puma_ray.runs import load_job_config, new_run_dir, set_threads
from puma_ray.selection import SelectionError
from puma_ray.store import StoreError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from migrate import _engine_functions  # noqa: E402  (the same engine choice as jobs/migrate.py: local or Ray)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (configs/benchmark_*.yaml)")
    parser.add_argument("--output", help="benchmark folder (local or s3://); default: a new folder under runs/")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. experiments.chain=null")
    args = parser.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in ["python", "jobs/benchmark.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        cfg = load_job_config(BenchmarkJobConfig, args.config, args.overrides)
        base = cfg.migrate_config("base", [("base", cfg.source)], cfg.target)
        set_threads(base.threads)
        output = new_run_dir(args.output, "benchmark")
        result = Benchmark(cfg, output, engine=_engine_functions).run(
            on_progress=lambda partial: write_benchmark({**partial, "command": command}, output, base.storage, command))
        md = write_benchmark({**result, "command": command}, output, base.storage, command)
    except (ConfigError, DataError, StoreError, AdapterError, SelectionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"benchmark: {md} ({result['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
