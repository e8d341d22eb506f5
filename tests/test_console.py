"""The console of a job shows our progress; Ray's and the libraries' internal messages go to the run's log file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from puma_ray.data import save_dataset

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)
# internal messages seen on the default run's console before (83 of its 164 lines were the first one), the token-auth
# notice of the local cluster's node processes and Ray Data's note that we turned its progress bars off
NOISE = ("PlacementGroupCleaner", "Warning:", "(RayTrainWorker", "(TrainController", "(SplitCoordinator",
         "(DatasetManager", "INFO worker.py", "Token authentication", "Progress bars disabled",
         "real_accelerator", "[WARNING]")  # DeepSpeed's accelerator probe, imported by save_pretrained (accelerate)


def test_migrate_console_is_ours_and_the_rest_is_in_the_log(toy_dataset, tmp_path):
    paths = save_dataset(toy_dataset, str(tmp_path / "data"))
    config = {"sources": [{"store": "{output}/source-store", "model": {"name": "tiny:llama"},
                           "prepare": {"epochs": 1, "batch_size": 64}}],
              "target": {"name": "tiny:qwen2"},
              "data": {"name": "parquet", "paths": {"records": paths["records"], "items": paths["items"]}},
              "selection": {"k": 3, "budget": 8, "valid_users": 5}, "fit": {"epochs": 2, "batch_size": 64},
              "baselines": {"fits_on": "local"}, "convert": {"runs_on": "local"},
              "engine": {"kind": "ray", "num_workers": 1, "local_cpus": 2}, "threads": 1}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "jobs/migrate.py", "--config", str(tmp_path / "job.yaml"), "--output",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          # as a user's shell, on a first run: an empty model cache, so the tiny models are written
                          # (save_pretrained) by the job itself
                          env={**{k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "DS_ACCELERATOR")},
                               "PUMA_MODEL_CACHE": str(tmp_path / "models")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = (proc.stdout + proc.stderr).splitlines()
    noise = [line for line in console if any(marker in line for marker in NOISE)]
    assert not noise, noise[:5]
    assert f"library and Ray messages: {out / 'logs' / 'libraries.log'}" in proc.stdout
    assert "fit puma" in proc.stdout and "epoch 1: train loss" in proc.stdout and "report:" in proc.stdout
    assert (out / "logs" / "libraries.log").stat().st_size > 0  # what left the console is kept
