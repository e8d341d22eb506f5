"""jobs/train_prompts.py end to end on the toy dataset: in-process (report, store, config errors) and as a CLI."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from puma_ray.artifacts.store import PromptStore
from puma_ray.data import save_dataset

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "train_prompts.py"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # main() sets torch threads; this restores them after


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("train_prompts_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy_paths(toy_dataset, tmp_path_factory):
    return save_dataset(toy_dataset, str(tmp_path_factory.mktemp("toy_data")))


def _args(paths: dict, output: Path, *extra: str) -> list[str]:
    return ["--output", str(output), "model.name=tiny:stablelm", "model.foundation=null",
            "data.name=parquet",
            f"data.paths.records={paths['records']}", f"data.paths.items={paths['items']}", "threads=1", *extra]


def test_job_in_process(job, toy_paths, toy_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    rc = job.main(_args(toy_paths, out, "train.epochs=2", "train.batch_size=32", "store.shard_rows=16"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"report: {out / 'report.json'}" in captured.out

    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "rating" and report["primary_metric"] == "rmse"
    assert set(report["methods"]) == {"store", "global_mean", "user_mean", "bias"}
    for name, m in report["methods"].items():
        assert math.isfinite(m["rmse"]) and math.isfinite(m["mae"]), name
        assert 0 < m["mae"] <= m["rmse"] < 4, name
        assert m["records"] == toy_dataset.summary()["records"]["test"]
    assert len(report["training"]["history"]) == 2
    # the trained prompts against their random start: 2 short epochs at init_scale 1 leave them mostly the start
    assert 0.5 < report["training"]["init_correlation"] <= 1.0
    assert report["model"]["name"] == "tiny:stablelm" and report["model"]["family"] == "stablelm"
    assert report["data"]["users"] == 40
    assert report["provenance"]["config"]["train"]["epochs"] == 2

    store_path = report["store"]
    assert store_path == str(out / "store") and os.path.isdir(store_path)
    store = PromptStore.open(store_path)
    assert store.manifest.num_users == len(toy_dataset.users) == 40
    assert len(store.manifest.shards) == 3  # 40 users at 16 rows a shard
    assert store.identity.fingerprint == report["model"]["fingerprint"]
    assert store.manifest.lineage["kind"] == "trained" and store.manifest.task == "rating"
    ids, prompts = store.read_all()
    assert ids.tolist() == toy_dataset.users.tolist()
    assert prompts.shape == (40, 1, 32)
    _, head_config = store.read_head()
    assert head_config["task"] == "rating"

    # a second run to the same store is refused (exit 2, names the store), unless overwrite is asked for
    rc = job.main(_args(toy_paths, out, "train.epochs=1"))
    assert rc == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("override, key", [("train.epoch=2", "epoch"), ("nonsense_section.x=1", "nonsense_section")])
def test_job_bad_config_key(job, toy_paths, tmp_path, capsys, override, key):
    rc = job.main(_args(toy_paths, tmp_path / "run", override))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error:") and f"unknown key(s) ['{key}']" in err
    assert not (tmp_path / "run" / "report.json").exists()


def test_job_cli_subprocess(toy_paths, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(JOB), *_args(toy_paths, out, "train.epochs=1", "data.max_users=8")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report:" in proc.stdout and "store:" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["users"] == 8
    assert PromptStore.open(report["store"]).manifest.num_users == 8


def test_model_device_is_checked_before_any_work(job, toy_paths, tmp_path, capsys):
    """A device name torch cannot use is one `error:` line naming model.device, exit 2, nothing written."""
    out = tmp_path / "bad-device"
    assert job.main(_args(toy_paths, out, "model.device=gpu")) == 2
    assert "model.device" in capsys.readouterr().err
    if not torch.cuda.is_available():  # a CPU build: cuda is refused with the reason, at model load
        assert job.main(_args(toy_paths, out, "model.device=cuda", "train.epochs=1")) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
        assert not (out / "store").exists()
    # auto on this machine: wherever torch sees a device, and the run completes
    assert job.main(_args(toy_paths, tmp_path / "auto", "model.device=auto", "train.epochs=1")) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_benchmark.sh)")
def test_store_trained_on_the_gpu_matches_the_cpu(job, toy_paths, tmp_path):
    """The model on the GPU, prompts and head on the CPU: the same store and test RMSE as all on the CPU, within
    float32 reduction-order noise."""
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert job.main(_args(toy_paths, out, f"model.device={device}", "train.epochs=2", "train.batch_size=32")) == 0
        reports[device] = json.loads((out / "report.json").read_text())
    a, b = (reports[d]["methods"]["store"]["rmse"] for d in ("cpu", "cuda"))
    assert abs(a - b) < 1e-3, (a, b)


def test_init_correlation_is_pearson_over_every_value():
    from puma_ray.training.prompts import init_correlation
    rng = np.random.default_rng(0)
    start = rng.uniform(-1, 1, (200, 1, 16))
    assert init_correlation(start, start) == pytest.approx(1.0)
    assert init_correlation(start, -2 * start) == pytest.approx(-1.0)
    assert abs(init_correlation(start, rng.normal(size=start.shape))) < 0.05
    signal = rng.normal(size=start.shape)  # equal variances: correlation 1/sqrt(2)
    assert init_correlation(start, start / start.std() + signal / signal.std()) == pytest.approx(2 ** -0.5, abs=0.03)


def test_sigterm_is_one_line_and_the_rerun_completes(job, toy_paths, tmp_path):
    """A `kill` (SIGTERM) mid-training takes Ctrl-C's way out: one `interrupted:` line, exit 130, no traceback, no
    store marked done; the same command then completes."""
    import signal
    out = tmp_path / "killed"
    cmd = [sys.executable, str(JOB), *_args(toy_paths, out, "train.epochs=200", "train.patience=200")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # each line as it is printed
    for line in proc.stdout:  # wait until the epoch loop runs
        if "epoch 0" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted:" in err and "Traceback" not in err, err[-2000:]
    assert not (out / "report.json").exists() and not (out / "store" / "manifest.json").exists()
    assert job.main(_args(toy_paths, out, "train.epochs=1")) == 0  # in process: one interpreter start is enough
    assert PromptStore.open(str(out / "store")).manifest.num_users == 40
