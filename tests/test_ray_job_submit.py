"""`ray job submit` of jobs/migrate.py to a real local Ray head, with data, stores and outputs in a loopback S3.

Runs the README's recipe (`scripts/ray_local.py start`, `submit -- jobs/migrate.py ...`, `stop`) from another working
directory and without the venv in the environment, checks the job succeeded and wrote the target store and report to
S3, and that `stop` left no process of that head (`ray stop` would stop every Ray on the machine).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

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


SCRIPT = [sys.executable, os.path.join(REPO, "scripts", "ray_local.py")]


@pytest.fixture
def ray_head():
    """The README's recipe: `scripts/ray_local.py start`, then `stop` (only this head's processes)."""
    temp_dir = f"/tmp/puma-ray-{os.getpid()}"  # short: Ray's unix socket paths must stay under 107 characters
    subprocess.run([*SCRIPT, "start", "--temp-dir", temp_dir, "--num-cpus", "2"], check=True, capture_output=True)
    try:
        with open(os.path.join(temp_dir, "puma_head.json")) as f:
            yield {"temp_dir": temp_dir, **json.load(f)}
    finally:
        stopped = subprocess.run([*SCRIPT, "stop", "--temp-dir", temp_dir], capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stderr
        leftover = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                    if any(temp_dir in part for part in p.info["cmdline"] or [])]
        subprocess.run(["rm", "-rf", temp_dir])  # the test's own folder
        assert not leftover, leftover


@pytest.mark.slow  # ~4-8 min on 2 cores (a Ray head, a job, S3): the README's recipe, run on purpose
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
    cmd = [*SCRIPT, "submit", "--temp-dir", ray_head["temp_dir"], "--", "jobs/migrate.py", "--config", str(cfg_path),
           "--output", f"{root}/run"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=800, cwd=str(tmp_path),
                          env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"})  # as from a bare shell
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
