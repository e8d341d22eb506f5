"""Driver peak memory of `jobs/migrate.py` under the Ray engine, against the user count.

    nice -n 10 .venv/bin/python benchmarks/driver_memory.py [--users 10000 100000] [--workdir /tmp/puma-driver-mem]

For each user count: a synthetic rating dataset (puma_ray/data/synthetic.py, few records per user) saved as
Parquet (`data.name: parquet`), a source store for tiny:llama written directly (random prompts at the model's
embedding RMS, the real model identity and a fresh RatingHead: no prompt training), then `jobs/migrate.py` in a
subprocess with engine {kind: ray, num_workers: 1} (a local Ray started in-process by the job), target tiny:qwen2,
an absolute selection budget, one fit epoch and every baseline off. The driver's memory (that process only, not
its Ray children) is polled every 0.2 s: RSS, RSS minus shared pages (Ray's object store is shared memory mapped
into the driver), and the kernel's high-water mark VmHWM. Each job log line is stamped with its time and the RSS
then, so the stage that holds the peak and the stage that takes the time can be read off.

Memory, not time, is the figure: on a shared 2-core machine wall times are only indicative.
The data and source store of a size are kept under --workdir and reused by a rerun.
Measured 2026-11 (2 shared cores, ~12 records/user): before two fixes, 10k users 893 MB / 159 s, 100k users
2,455 MB / 1,708 s (1,550 s in np.setdiff1d over object-dtype user ids, O(users^2); the peak in the test
evaluation, glibc keeping freed activations). After (unicode id arrays, puma_ray/training/memory.py trimming every 32
batches): 10k 908 MB / 120 s, 100k 1,268 MB / 185 s.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_MODEL, TARGET_MODEL = "tiny:llama", "tiny:qwen2"
PROMPT_LENGTH = 1
# a job log line that marks where a stage begins (jobs/migrate.py: puma_ray.recipes.migration's stages under the
# in-process executor or, with --driver lean, the Ray executor): (how, text, stage)
STAGES = {
    "full": (("startswith", "data {", "source store read + join, variance (Ray Data), K-means"),
             ("startswith", "selection ", "target load, test RecordSet"),
             ("startswith", "fit puma", "adapter fit (Ray Train), adapter save"),
             ("startswith", "evaluate puma", "test evaluation (driver)"),
             ("contains", "_UnitActor", "conversion (Ray Data actor pool)"),
             ("startswith", "converted ", "report, Ray shutdown")),
    "lean": (("startswith", "data ", "store index, K-means sample, shard pass (actors)"),
             ("startswith", "selection ", "fit users' prompts + records (Parquet filter in a Ray task)"),
             ("startswith", "fit puma", "adapter fit (Ray Train), adapter save"),
             ("startswith", "evaluate puma", "test evaluation of PUMA (actor pool)"),
             ("startswith", "evaluate source", "test evaluation of the source store (actor pool)"),
             ("startswith", "convert every user", "conversion (actor pool)"),
             ("startswith", "converted ", "report, Ray shutdown")),
}


def synthetic_options(users: int, args) -> dict:
    return {"n_users": users, "seed": 0, "min_records": args.min_records,
            "records_median_extra": args.records_median_extra, "max_records": args.max_records}


def make_data(users: int, folder: str, args) -> dict:
    """records.parquet + items.parquet (with the split column) under folder; reused when present."""
    from puma_ray.config import DataConfig
    from puma_ray.data import load_dataset, save_dataset
    marker = os.path.join(folder, "data.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return json.load(f)
    ds = load_dataset(DataConfig(name="synthetic", options=synthetic_options(users, args)))
    paths = save_dataset(ds, folder)
    info = {"paths": paths, "users": int(ds.records["user_id"].nunique()), "records": int(len(ds.records)),
            "test_records": int((ds.records["split"] == "test").sum()),
            "user_ids": os.path.join(folder, "users.npy")}
    np.save(info["user_ids"], ds.users.astype(str))
    with open(marker, "w") as f:
        json.dump(info, f)
    return info


def make_source_store(path: str, user_ids: np.ndarray, shard_rows: int) -> dict:
    """Random prompts at tiny:llama's embedding scale, bound to its real identity; reused when present."""
    from puma_ray.artifacts.store import MANIFEST, StoreWriter
    from puma_ray.config import TemplateConfig, to_dict
    from puma_ray.models.backbone import embedding_rms, load_backbone
    from puma_ray.models.heads import RatingHead, head_config
    backbone = load_backbone(SOURCE_MODEL)
    d = backbone.identity.hidden_size
    if not os.path.exists(os.path.join(path, MANIFEST)):
        rms = embedding_rms(backbone.model)
        writer = StoreWriter(path, backbone.identity, PROMPT_LENGTH, to_dict(TemplateConfig()), "rating",
                             shard_rows=shard_rows, overwrite=True,
                             lineage={"kind": "trained", "data": "synthetic", "note": "random, untrained"})
        for start in range(0, len(user_ids), shard_rows):
            ids = user_ids[start:start + shard_rows]
            rng = np.random.default_rng([0, start])
            writer.write_shard(ids, (rng.standard_normal((len(ids), PROMPT_LENGTH, d)) * rms).astype(np.float32))
        head = RatingHead()
        writer.write_head(head.state_dict(), head_config("rating", head))
        writer.close()
    return {"d": d}


def write_config(path: str, data_paths: dict, store: str, args) -> None:
    import yaml
    cfg = {
        "sources": [{"store": store, "model": {"name": SOURCE_MODEL}}],
        "target": {"name": TARGET_MODEL},
        "data": {"name": "parquet", "paths": data_paths},
        "selection": {"strategy": "kmeans_variance", "budget": args.budget, "valid_users": args.valid_users,
                      "k": args.k},
        "fit": {"epochs": 1, "batch_size": 64, "lr": 0.01, "patience": 1},
        # evaluation on: PUMA and the source store on the test split of every user (the issue's "methods source
        # and puma at least"); the baselines that need every prompt in the driver stay off
        "baselines": {"source": True, "random_init": False, "linear": False, "full_retrain": False},
        "store": {"shard_rows": args.shard_rows},
        "convert": {"actors": 1, "progress": False},
        "engine": {"kind": "ray", "num_workers": 1, "local_cpus": 2, "driver": args.driver, "actors": args.actors},
    }
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def _hwm_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_migrate(config: str, output: str, log_path: str, timeout_s: float) -> dict:
    """Runs the job, polls its RSS every 0.2 s; returns peaks, wall time, stamped log lines."""
    if os.path.exists(output):
        shutil.rmtree(output)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "migrate.py"), "--config", config, "--output", output]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    ps = psutil.Process(proc.pid)
    state = {"rss": 0, "private": 0, "hwm": 0, "rss_now": 0}
    lines: list[tuple[float, int, str]] = []
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            try:
                mi = ps.memory_info()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                break
            state["rss_now"] = mi.rss
            samples.append((time.perf_counter() - t0, mi.rss))
            state["rss"] = max(state["rss"], mi.rss)
            state["private"] = max(state["private"], mi.rss - mi.shared)
            state["hwm"] = max(state["hwm"], _hwm_bytes(proc.pid))
            done.wait(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    with open(log_path, "w", buffering=1) as log:
        for line in proc.stdout:
            stamp = (time.perf_counter() - t0, state["rss_now"], line.rstrip("\n"))
            lines.append(stamp)
            log.write(f"[{stamp[0]:8.1f}s rss {stamp[1] / 2**20:7.0f}MB] {line}")
    rc = proc.wait()
    timer.cancel()
    done.set()
    poller.join()
    return {"rc": rc, "wall_s": time.perf_counter() - t0, "peak_rss": state["rss"],
            "peak_private": state["private"], "vm_hwm": state["hwm"], "lines": lines, "samples": samples}


def stages(lines: list, samples: list, wall_s: float, driver: str) -> list[tuple[str, float, float]]:
    """(stage, seconds, peak sampled RSS MB within it) from the stamped log: a stage runs until the next one's first
    line."""
    marks = [(0.0, "start-up: imports, Ray init" + (", data read" if driver == "full" else
                                                      ", per-user rows (Ray Data groupby)"))]
    seen = set()
    for t, rss, text in lines:
        for how, key, name in STAGES[driver]:
            hit = text.startswith(key) if how == "startswith" else key in text
            if hit and name not in seen:
                seen.add(name)
                marks.append((t, name))
    marks.append((wall_s, "end"))
    out = []
    for (t, name), (t_next, _) in zip(marks, marks[1:]):
        inside = [r for ts, r in samples if t <= ts < t_next]
        out.append((name, t_next - t, max(inside, default=0) / 2**20))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--workdir", default="/tmp/puma-driver-mem")
    ap.add_argument("--min-records", type=int, default=5)
    ap.add_argument("--records-median-extra", type=float, default=5.0)
    ap.add_argument("--max-records", type=int, default=60)
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--valid-users", type=int, default=100)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--shard-rows", type=int, default=16_384)
    ap.add_argument("--driver", choices=["lean", "full"], default="lean",
                    help="lean: the driver holds per-user rows only; full: it reads every record and prompt")
    ap.add_argument("--actors", type=int, default=2, help="evaluation / shard-pass actors (lean)")
    ap.add_argument("--timeout-min", type=float, default=40.0, help="kill a migrate run after this long")
    ap.add_argument("--plan-only", action="store_true",
                    help="prepare data, store and config, then print `jobs/migrate.py --plan` instead of running")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    rows = []
    for users in args.users:
        folder = os.path.join(args.workdir, f"u{users}")
        os.makedirs(folder, exist_ok=True)
        t = time.perf_counter()
        data = make_data(users, os.path.join(folder, "data"), args)
        user_ids = np.load(data["user_ids"])
        store = os.path.join(folder, "source-store")
        d = make_source_store(store, user_ids, args.shard_rows)["d"]
        print(f"[{users} users] data {data['records']:,} records ({data['test_records']:,} test), source store "
              f"d={d}: {time.perf_counter() - t:.0f}s to prepare", flush=True)
        config = os.path.join(folder, "migrate.yaml")
        write_config(config, data["paths"], store, args)
        if args.plan_only:  # what the run would spend, beside the measured figures of an earlier run
            t = time.perf_counter()
            subprocess.run([sys.executable, "jobs/migrate.py", "--config", config, "--output",
                            os.path.join(folder, "run"), "--plan"], check=True)
            print(f"[{users} users] plan in {time.perf_counter() - t:.0f}s", flush=True)
            continue
        log_path = os.path.join(folder, "migrate.log")
        res = run_migrate(config, os.path.join(folder, "run"), log_path, args.timeout_min * 60)
        with open(os.path.join(folder, "rss.csv"), "w") as f:  # the whole RSS timeline, for a closer look
            f.write("t_s,rss_mb\n" + "".join(f"{t:.1f},{r / 2**20:.1f}\n" for t, r in res["samples"]))
        print(f"[{users} users] migrate rc={res['rc']} in {res['wall_s']:.0f}s, log {log_path}", flush=True)
        for name, secs, rss in stages(res["lines"], res["samples"], res["wall_s"], args.driver):
            print(f"    {name:<56}{secs:8.1f}s   peak RSS {rss:7.0f} MB", flush=True)
        if res["rc"] != 0:
            print("\n".join(text for _, _, text in res["lines"][-30:]), flush=True)
        rows.append({"users": data["users"], "records": data["records"], "test": data["test_records"],
                     "prompt_mb": data["users"] * PROMPT_LENGTH * d * 4 / 2**20, "rc": res["rc"],
                     "wall_s": res["wall_s"], "rss_mb": res["peak_rss"] / 2**20,
                     "private_mb": res["peak_private"] / 2**20, "hwm_mb": res["vm_hwm"] / 2**20})

    print(f"\nsource {SOURCE_MODEL} (l={PROMPT_LENGTH}) -> target {TARGET_MODEL}; engine ray, 1 worker; "
          f"budget {args.budget}, {args.valid_users} validation users, 1 epoch, baselines off")
    print(f"{'users':>9}{'records':>11}{'test rec':>10}{'prompts MB':>12}{'peak RSS MB':>13}{'RSS-shared MB':>15}"
          f"{'VmHWM MB':>10}{'wall s':>8}{'rc':>4}")
    for r in rows:
        print(f"{r['users']:>9,}{r['records']:>11,}{r['test']:>10,}{r['prompt_mb']:>12.1f}{r['rss_mb']:>13.0f}"
              f"{r['private_mb']:>15.0f}{r['hwm_mb']:>10.0f}{r['wall_s']:>8.0f}{r['rc']:>4}")
    for a, b in zip(rows, rows[1:]):
        du = b["users"] - a["users"]
        print(f"growth {b['users']:,}/{a['users']:,} users: prompt matrix x{b['prompt_mb'] / a['prompt_mb']:.2f}, "
              f"driver peak RSS x{b['rss_mb'] / a['rss_mb']:.2f} (VmHWM x{b['hwm_mb'] / a['hwm_mb']:.2f}); "
              f"marginal driver bytes/user {(b['hwm_mb'] - a['hwm_mb']) * 2**20 / du:,.0f} (VmHWM) vs prompt "
              f"{(b['prompt_mb'] - a['prompt_mb']) * 2**20 / du:,.0f}, records/user {b['records'] / b['users']:.1f}")
    if len(rows) >= 2:  # the figure the scale-out is judged by: first and last size of this one run
        first, last = rows[0], rows[-1]
        print(f"driver peak RSS: {last['rss_mb'] / first['rss_mb']:.2f}x for {last['users'] / first['users']:.0f}x "
              "users")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
