"""Batch-conversion throughput: the Ray actor pool (jobs/convert.py's path) / a plain-process roofline, one run.

    .venv/bin/python benchmarks/convert_throughput.py [--users 1000000] [--sizes 64x96 576x640] [--actors 2]

Per size d_s x d_t: a synthetic source store of --users prompts (l=1, 65,536 rows a shard) and a random adapter
(the paper's MLP, hidden = d_t: conversion stays I/O-bound, as it is at the paper's 2048 → 3072 on a GPU).
  roofline  the same read → adapter → write in one plain process: pyarrow read_table, torch forward on all
            cores, pyarrow write_table; no checksums, no checks, no progress records
  ray       convert.convert with the Ray Data actor pool (--actors actors x 1 torch thread), in a fresh
            process per run so that peak memory is that run's: driver peak RSS and the largest actor peak RSS
rows/s: end to end (planning, actor start-up, finalize included) and steady (rows / first unit start → last
unit end: the pool at work, its one-off start-up excluded).
Peak memory is reported at 100k and at --users prompts: it should not grow with the number of prompts.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def _roofline_pass(source: str, out_dir: str, adapter, threads: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    torch.set_num_threads(threads)
    os.makedirs(out_dir, exist_ok=True)
    rows, start = 0, time.perf_counter()
    with torch.no_grad():
        for name in sorted(os.listdir(os.path.join(source, "shards"))):
            table = pq.read_table(os.path.join(source, "shards", name))
            col = table.column("prompt").combine_chunks()
            x = np.array(col.flatten().to_numpy(zero_copy_only=False)).reshape(len(table), 1, -1)
            y = adapter(torch.from_numpy(x)).numpy().reshape(len(table), -1)
            out = pa.table({"user_id": table.column("user_id"),
                            "prompt": pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), y.shape[1])})
            pq.write_table(out, os.path.join(out_dir, name))
            rows += len(table)
    wall = time.perf_counter() - start
    return {"rows": rows, "wall_s": round(wall, 2), "rows_per_s": round(rows / wall), "threads": threads}


def _roofline(source: str, out_dir: str, adapter_path: str) -> dict:
    """The faster of all cores and one core: on a loaded machine, torch's threads on all cores can wait on each
    other and lose to one thread; the roofline is what one plain process can do at best."""
    from puma_ray.artifacts.adapter_io import load_adapter
    adapter = load_adapter(adapter_path)[0]
    passes = [_roofline_pass(source, out_dir, adapter, t) for t in sorted({len(os.sched_getaffinity(0)), 1})]
    return max(passes, key=lambda p: p["rows_per_s"])


def _one_ray_run(source: str, target: str, adapter_path: str, actors: int) -> dict:
    """Runs in a fresh process (--one): the Ray conversion alone, timed per result as the driver receives it."""
    from puma_ray.conversion.run import ConvertConfig, convert
    from puma_ray.ray_layer import ensure_ray, run_on_ray
    ensure_ray(num_cpus=len(os.sched_getaffinity(0)))
    records = []

    def recording_runner(plan, units, cfg, storage):
        for record in run_on_ray(plan, units, cfg, storage):
            records.append(record)
            yield record

    cfg = ConvertConfig(actors=actors, cpus_per_actor=0.5, threads_per_actor=1, progress=False)
    summary = convert(adapter_path, [source], target, cfg, runner=recording_runner, log=lambda *_: None)
    steady_s = max(r["finished_at"] for r in records) - min(r["started_at"] for r in records)
    return {"rows": summary["users"], "wall_s": summary["wall_s"], "rows_per_s": summary["rows_per_s"],
            "steady_rows_per_s": round(summary["users"] / steady_s),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "actor_peak_rss_mb": max(r["worker_peak_rss_mb"] for r in records)}


def _ray_run(source: str, target: str, adapter_path: str, actors: int) -> dict:
    cmd = [sys.executable, __file__, "--one", source, target, adapter_path, str(actors)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=100_000, help="the second size for the peak-memory comparison")
    ap.add_argument("--sizes", nargs="+", default=["64x96", "576x640"])
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        source, target, adapter_path, actors = args.one
        print(json.dumps(_one_ray_run(source, target, adapter_path, int(actors))))
        return
    from puma_ray.tools.synthetic_prompts import write_synthetic_adapter, write_synthetic_store
    work = args.workdir or tempfile.mkdtemp(prefix="convert-bench-")
    results = {}
    try:
        for size in args.sizes:
            d_s, d_t = map(int, size.split("x"))
            base = os.path.join(work, size)
            adapter = write_synthetic_adapter(os.path.join(base, "adapter"), [d_s], d_t, 1, hidden=d_t)
            row = {}
            for n in (args.small, args.users):
                source = write_synthetic_store(os.path.join(base, f"source-{n}"), n, 1, d_s, 65_536, overwrite=True)
                ray_run = _ray_run(source, os.path.join(base, f"target-{n}"), adapter, args.actors)
                row[n] = {"ray": ray_run}
                if n == args.users:
                    row[n]["roofline"] = _roofline(source, os.path.join(base, "roofline"), adapter)
                for sub in (f"source-{n}", f"target-{n}", "roofline"):
                    shutil.rmtree(os.path.join(base, sub), ignore_errors=True)
            big = row[args.users]
            results[size] = row
            print(f"{size}: {args.users:,} prompts  ray {big['ray']['rows_per_s']:,} rows/s end to end, "
                  f"{big['ray']['steady_rows_per_s']:,} steady  |  roofline {big['roofline']['rows_per_s']:,} rows/s"
                  f"  |  ratio {big['ray']['rows_per_s'] / big['roofline']['rows_per_s']:.2f} end to end, "
                  f"{big['ray']['steady_rows_per_s'] / big['roofline']['rows_per_s']:.2f} steady")
            for n in (args.small, args.users):
                r = row[n]["ray"]
                print(f"    {n:>9,} prompts: driver peak {r['driver_peak_rss_mb']:.0f} MB, "
                      f"largest actor peak {r['actor_peak_rss_mb']:.0f} MB, {r['wall_s']} s")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
