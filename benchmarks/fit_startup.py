"""A Ray Train fit's start-up with DeepSpeed's CPU comm op to compile (a fresh environment, or the shared folder
another environment's build last wrote) against the op built ahead (`python -m puma_ray.tools.deepspeed_ops`, run by
scripts/setup.sh): the cut of issue 24's "start-up reported apart from work and cut".

    .venv/bin/python benchmarks/fit_startup.py [--workdir /tmp/puma-fit-startup] [--users 2000]

Each case runs `jobs/migrate.py` in a subprocess (a local Ray, engine ray, one Train worker, PUMA only, one fit
epoch) on the same synthetic data and source store (benchmarks/driver_memory.py's), and reads the report's
`cost.puma.startup_s` (the fit's wall minus the workers' own epochs) and `work_s`. "cold" points
TORCH_EXTENSIONS_DIR at an empty folder: what every fit of a fresh worker paid before the op was built ahead, and
what fits paid in turn while environments shared one folder. The ratio is measured in one run (noisy machines).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from driver_memory import SOURCE_MODEL, TARGET_MODEL, make_data, make_source_store  # noqa: E402


def run_case(config: str, output: str, extensions: str | None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu"}
    if extensions:
        env["TORCH_EXTENSIONS_DIR"] = extensions
    else:
        env.pop("TORCH_EXTENSIONS_DIR", None)  # the job's own: this environment's folder, built ahead
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "migrate.py"), "--config", config,
                           "--output", output], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"migrate failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    with open(os.path.join(output, "report.json")) as f:
        cost = json.load(f)["cost"]["puma"]
    return {"startup_s": cost["startup_s"], "work_s": cost["work_s"], "fit_wall_s": cost["wall_s"],
            "job_wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/puma-fit-startup")
    ap.add_argument("--users", type=int, default=2000)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    data_args = argparse.Namespace(min_records=5, records_median_extra=5, max_records=40)
    info = make_data(args.users, os.path.join(args.workdir, "data"), data_args)
    store = os.path.join(args.workdir, "source-store")
    make_source_store(store, np.load(info["user_ids"]), 4096)
    config = os.path.join(args.workdir, "migrate.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({
            "sources": [{"store": store, "model": {"name": SOURCE_MODEL}}], "target": {"name": TARGET_MODEL},
            "data": {"name": "parquet", "paths": info["paths"]},
            "selection": {"strategy": "random", "budget": 100, "valid_users": 20},
            "fit": {"epochs": 1, "batch_size": 64, "patience": 1},
            "baselines": {"source": False, "random_init": False, "linear": False, "full_retrain": False},
            "gate": {"enabled": False}, "store": {"shard_rows": 4096}, "convert": {"actors": 1, "progress": False},
            "engine": {"kind": "ray", "num_workers": 1, "local_cpus": 2}}, f)
    from puma_ray.tools.deepspeed_ops import build_cpu_ops, extensions_dir
    print(f"op built ahead: {build_cpu_ops():.1f}s ({extensions_dir()})")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ext-cold-") as cold:
        rows["cold (op compiled in the fit)"] = run_case(config, os.path.join(args.workdir, "out-cold"), cold)
    rows["built ahead (setup.sh)"] = run_case(config, os.path.join(args.workdir, "out-warm"), None)
    print(f"\n{args.users} users, 1 fit epoch, 1 Train worker, {os.cpu_count()} CPUs\n")
    print(f"{'case':32s} {'start-up s':>10s} {'work s':>8s} {'fit wall s':>10s} {'job wall s':>10s}")
    for name, r in rows.items():
        print(f"{name:32s} {r['startup_s']:10.1f} {r['work_s']:8.1f} {r['fit_wall_s']:10.1f} {r['job_wall_s']:10.1f}")
    cold, warm = rows.values()
    print(f"\nstart-up built ahead / cold: {warm['startup_s'] / cold['startup_s']:.2f}x "
          f"(fit wall {warm['fit_wall_s'] / cold['fit_wall_s']:.2f}x)")


if __name__ == "__main__":
    main()
