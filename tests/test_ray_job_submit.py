"""`ray job submit` of jobs/migrate.py to a real local Ray head, with data, stores and outputs in a loopback S3.

Starts `ray start --head` (its own temp dir and ports), submits, checks the job succeeded and wrote the target store
and report to S3, then stops exactly the processes it started (`ray stop` would stop every Ray on the machine).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from puma_ray.artifacts.store import PromptStore
from puma_ray.config import TemplateConfig
from puma_ray.data import save_dataset
from puma_ray.fs import StorageOptions, filesystem
from puma_ray.recipes.train_prompts import TrainPromptsJobConfig, train_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
pytestmark = pytest.mark.timeout(900)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    # short temp dir: Ray's unix socket paths must stay under 107 characters
    temp_dir = f"/tmp/puma-ray-{os.getpid()}"
    port, dash, agent, client = (_free_port() for _ in range(4))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # Ray 2.60's job server wants a token otherwise
    # every port our own: a leftover agent of another cluster on a default port makes submissions fail with
    # "No available agent to submit job"
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}",
                    f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
                    "--include-dashboard=true", "--disable-usage-stats"], check=True, env=env, capture_output=True)
    try:
        yield {"address": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        # the cluster's processes name its temp dir on their command line; agents retitle themselves
        # ("ray::DashboardAgent"), so their parents' descendants are collected too
        ours = set()
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(temp_dir in part or f"={client}" in part for part in proc.info["cmdline"] or []):
                    ours.add(proc)
                    ours.update(proc.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        for proc in ours:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        time.sleep(1)
        subprocess.run(["rm", "-rf", temp_dir])


def test_ray_job_submit_migrate_on_s3(ray_head, s3_server, toy_dataset, tmp_path):
    storage = StorageOptions(endpoint_url=s3_server["endpoint_url"])
    root = f"s3://{s3_server['bucket']}/jobtest"
    paths = save_dataset(toy_dataset, f"{root}/data", storage)
    src = TrainPromptsJobConfig(storage=storage)
    src.model.name = "tiny:stablelm"
    src.train.epochs, src.train.batch_size = 1, 32
    train_store(src, toy_dataset, f"{root}/source-store", log=lambda m: None)
    config = {
        "sources": [{"store": f"{root}/source-store", "model": {"name": "tiny:stablelm"}}],
        "target": {"name": "tiny:llama"},
        "data": {"name": "parquet", "paths": paths},
        "template": vars(TemplateConfig()),
        "selection": {"budget": 8, "k": 4, "valid_users": 6},
        "fit": {"epochs": 2, "batch_size": 32},
        "baselines": {"linear": False, "random_init": False, "fits_on": "local"},
        "engine": {"kind": "ray", "cpus_per_worker": 0.5, "storage_path": f"{root}/train"},
        "storage": {"endpoint_url": s3_server["endpoint_url"]},
    }
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text("# ray job submit ... -- python jobs/migrate.py --config job.yaml\n" + yaml.safe_dump(config))
    runtime_env = {"working_dir": REPO, "excludes": [".venv", "runs", "models", ".git"],
                   "env_vars": {k: os.environ[k] for k in ("PUMA_MODEL_CACHE", "HF_HUB_OFFLINE", "AWS_ACCESS_KEY_ID",
                                                           "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                                           "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR")
                                if k in os.environ}}
    cmd = [RAY, "job", "submit", "--address", ray_head["address"], "--runtime-env-json", json.dumps(runtime_env),
           "--", sys.executable, "jobs/migrate.py", "--config", str(cfg_path), "--output", f"{root}/run"]
    for _ in range(30):  # the head's job agent comes up a few seconds after `ray start` returns
        done = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=800)
        if "No available agent" not in done.stderr + done.stdout:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in (done.stdout + done.stderr)

    fs, inner = filesystem(f"{root}/run/report.json", storage)
    with fs.open(inner) as f:
        report = json.load(f)
    assert report["store"] == f"{root}/run/target-store"
    store = PromptStore.open(report["store"], storage)
    ids, prompts = store.read_all()
    assert sorted(ids) == sorted(toy_dataset.users) and prompts.shape[2] == 48
    assert store.manifest.lineage["sources"][0]["store"] == f"{root}/source-store"
    assert set(report["methods"]) == {"puma", "source"}
