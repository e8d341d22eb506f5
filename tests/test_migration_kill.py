"""A migration SIGKILLed inside a stage (selection, the fit, full retraining, the conversion) is finished by the
same command: the rerun runs no stage the ledger holds as finished, and its report and store equal an
uninterrupted run's (metrics to 1e-6, `--verify` ok). With a Ray engine, nothing of the run's private Ray is left
running after the kill.

jobs/migrate.py in subprocesses, tiny models, 40 toy users. The fit case runs by default (~1 min); the other
stages and the Ray case are `-m slow`.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from puma_ray.data import save_dataset

REPO = Path(__file__).resolve().parents[1]
RECORDED = ["selection_statistics", "selection", "fit", "linear", "random_init", "candidates", "full_retrain",
            "evaluation", "conversion", "gate"]


@pytest.fixture(scope="module")
def job_yaml(toy_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill")
    paths = save_dataset(toy_dataset, str(folder / "data"))
    config = {"sources": [{"store": "{output}/source-store", "model": {"name": "tiny:stablelm"},
                           "prepare": {"epochs": 1, "batch_size": 32}}],
              "target": {"name": "tiny:llama"}, "data": {"name": "parquet", "paths": paths},
              "selection": {"budget": 10, "k": 4, "valid_users": 4},
              # enough epochs that the kill lands inside the fit and full retraining
              "fit": {"epochs": 6, "batch_size": 8, "patience": 6},
              "baselines": {"full_retrain": True, "full_retrain_train": {"epochs": 4, "batch_size": 8},
                            "fits_on": "local"},
              "store": {"shard_rows": 8}, "engine": {"kind": "local"}, "convert": {"runs_on": "local"},
              "threads": 1}
    (folder / "job.yaml").write_text(yaml.safe_dump(config))
    return folder / "job.yaml"


def command(config: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-u", "jobs/migrate.py", "--config", str(config), "--output", str(out), *overrides]


ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def uninterrupted(job_yaml, tmp_path_factory):
    """The run every resumed one is compared with; while it runs, a second migration into the same output is
    refused (one line naming the holder, exit 2) and leaves it undisturbed."""
    out = tmp_path_factory.mktemp("whole") / "run"
    proc = subprocess.Popen(command(job_yaml, out), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    console = []
    for line in proc.stdout:
        console.append(line)
        if line.startswith("stage 1/"):
            break
    second = subprocess.run(command(job_yaml, out), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    lines = [x for x in second.stderr.splitlines() if x.strip()]
    console.append(proc.communicate(timeout=600)[0])
    assert proc.returncode == 0, "".join(console)[-3000:]
    assert second.returncode == 2 and len(lines) == 1, second.stdout + second.stderr
    assert f"is being written by pid {proc.pid}" in lines[0]
    return json.loads((out / "report.json").read_text())


def kill_in(stage: str, cmd: list[str], env: dict, out: Path) -> tuple[set, str]:
    """Starts `cmd`, SIGKILLs its whole process group as soon as `stage` has started (for the conversion: once a
    unit is done), and returns the stages the ledger holds as finished at that moment, and the console."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    console, started = [], False
    try:
        for line in proc.stdout:
            console.append(line)
            if f" {stage} (elapsed" in line and line.startswith("stage "):
                started = True
                break
        if stage == "conversion":  # killed between units: some converted, not all
            deadline = time.time() + 120
            while time.time() < deadline and not list((out / "target-store" / "_progress").glob("*.json")):
                time.sleep(0.05)
        elif stage in ("fit", "full_retrain"):  # inside the loop: after its first epoch
            for line in proc.stdout:
                console.append(line)
                if "epoch 1" in line:
                    break
    finally:
        finished = {p.stem for p in (out / "ledger").glob("*.json")} if (out / "ledger").exists() else set()
        os.killpg(proc.pid, signal.SIGKILL)
        console.append(proc.communicate()[0] or "")
    assert started and proc.returncode == -signal.SIGKILL, "".join(console)[-3000:]
    return finished, "".join(console)


def assert_same_report(report: dict, whole: dict) -> None:
    for name, metrics in whole["methods"].items():
        for key, value in metrics.items():
            assert math.isclose(report["methods"][name][key], value, rel_tol=1e-6, abs_tol=1e-9), (name, key)
    assert report["reference"] == whole["reference"]
    assert report["adapter_choice"]["shipped"] == whole["adapter_choice"]["shipped"]
    assert report["gate"]["worse"] == whole["gate"]["worse"] and report["gate"]["users"] == whole["gate"]["users"]


def resume_after_kill(stage: str, job_yaml: Path, out: Path, whole: dict, env: dict = ENV) -> dict:
    finished, console = kill_in(stage, command(job_yaml, out), env, out)
    assert stage not in finished or stage == "selection", console[-2000:]  # killed inside it
    rerun = subprocess.run(command(job_yaml, out), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    status = {name: s["status"] for name, s in report["stages"].items()}
    reusable = finished & set(RECORDED)
    if "selection" not in finished:  # its record keeps the scales, not the per-user features the selection reads
        reusable.discard("selection_statistics")
    assert {n for n in RECORDED if status[n] == "reused"} == reusable, (status, finished)
    assert {n for n in RECORDED if status[n] == "ran"} == set(RECORDED) - reusable
    assert_same_report(report, whole)
    verify = subprocess.run([sys.executable, "jobs/convert.py", "--verify", str(out / "target-store")], cwd=REPO,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0 and "verify ok" in verify.stdout, verify.stdout + verify.stderr
    return report


def test_killed_in_the_fit_resumes(job_yaml, uninterrupted, tmp_path):
    resume_after_kill("fit", job_yaml, tmp_path / "run", uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["selection", "full_retrain", "conversion"])
def test_killed_in_a_stage_resumes(job_yaml, uninterrupted, tmp_path, stage):
    env = {**ENV, "PUMA_CONVERT_UNIT_DELAY_S": "0.5"} if stage == "conversion" else ENV
    resume_after_kill(stage, job_yaml, tmp_path / "run", uninterrupted, env)


def ray_processes(ray_tmp: str) -> list[str]:
    """Every process of the private Ray under `ray_tmp` (its session folder is on their command lines, or its
    RAY_TMPDIR in their environment)."""
    import psutil
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            line = " ".join(proc.info["cmdline"] or [])
            if ray_tmp in line or proc.environ().get("RAY_TMPDIR") == ray_tmp:
                found.append(f"{proc.pid} {line[:80]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_ray_migration_leaves_no_ray_process_and_resumes(job_yaml, tmp_path, how):
    """The driver alone is killed (as `kill` does; SIGTERM: one `interrupted:` line, exit 130), during the adapter
    fit on Ray Train; within 30 s no process of its private Ray is left; the same command then finishes, reusing
    the stages before the fit."""
    import tempfile
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**ENV, "RAY_TMPDIR": ray_tmp}
    out = tmp_path / "run"
    cmd = command(job_yaml, out, "engine.kind=ray", "engine.local_cpus=2", "baselines.full_retrain=false")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    console = []
    for line in proc.stdout:
        console.append(line)
        if "epoch 1" in line:
            break
    assert ray_processes(ray_tmp), "".join(console)[-2000:]
    proc.send_signal(how)
    console.append(proc.communicate(timeout=120)[0])
    if how == signal.SIGTERM:
        assert proc.returncode == 130 and "interrupted:" in "".join(console), "".join(console)[-2000:]
    deadline = time.time() + 30
    while ray_processes(ray_tmp) and time.time() < deadline:
        time.sleep(1)
    assert not ray_processes(ray_tmp), ray_processes(ray_tmp)
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    status = {n: s["status"] for n, s in json.loads((out / "report.json").read_text())["stages"].items()}
    assert status["selection"] == "reused" and status["fit"] == "ran", status
    assert not ray_processes(ray_tmp)  # the finished job took its private Ray down too
