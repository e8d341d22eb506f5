"""One writer per output: a second conversion or export into a folder being written is refused with one line
naming the holder; the lock dies with its holder (kill -9), and on S3 a dead holder's lease expires."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from puma_ray.artifacts import lock as lock_module
from puma_ray.artifacts.lock import OutputLock
from puma_ray.artifacts.store import StoreError
from puma_ray.tools.synthetic_prompts import write_synthetic_adapter, write_synthetic_store

ROOT = Path(__file__).resolve().parents[1]
USERS, L, D_S, D_T, SHARD = 40, 1, 8, 16, 10


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    return {"source": write_synthetic_store(str(root / "source"), USERS, L, D_S, SHARD),
            "adapter": write_synthetic_adapter(str(root / "adapter"), [D_S], D_T, L, hidden=16)}


def _convert_cmd(made, output, *extra):
    return [sys.executable, "jobs/convert.py", "--adapter", made["adapter"], "--source", made["source"],
            "--output", str(output), "--engine", "local", "--no-progress", *extra]


def _slow_env(pid_dir: Path) -> dict:
    # the kill tests' hooks: a pid file per unit started and a pause per unit, so a run is caught mid-way
    return {**os.environ, "PUMA_CONVERT_PID_DIR": str(pid_dir), "PUMA_CONVERT_UNIT_DELAY_S": "6"}


def _wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not any(path.iterdir()):
        assert time.time() < deadline, "the first writer never started a unit"
        time.sleep(0.1)


def test_a_second_writer_is_refused_and_the_first_completes(made, tmp_path):
    output, pids = tmp_path / "target", tmp_path / "pids"
    pids.mkdir()
    first = subprocess.Popen(_convert_cmd(made, output), cwd=ROOT, env=_slow_env(pids), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(pids)
        for extra in ((), ("--overwrite",)):  # --overwrite is no way past a running writer either
            second = subprocess.run(_convert_cmd(made, output, *extra), cwd=ROOT, capture_output=True, text=True,
                                    timeout=300)
            lines = [x for x in second.stderr.splitlines() if x.strip()]
            assert second.returncode == 2 and len(lines) == 1, second.stderr
            assert "is being written by pid" in lines[0] and str(first.pid) in lines[0]
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert f"converted {USERS} users" in out and "0 of" not in out
    assert not (output / "_lock").exists()  # released: the store holds only what it should
    verify = subprocess.run([sys.executable, "jobs/convert.py", "--verify", str(output)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stderr


def test_the_lock_dies_with_a_killed_writer(made, tmp_path):
    output, pids = tmp_path / "target", tmp_path / "pids"
    pids.mkdir()
    first = subprocess.Popen(_convert_cmd(made, output), cwd=ROOT, env=_slow_env(pids),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(pids)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert (output / "_lock").exists()  # left behind by the kill, but no longer held
    rerun = subprocess.run(_convert_cmd(made, output), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert not (output / "_lock").exists()


def test_a_users_file_named_like_the_lock_is_never_taken(tmp_path):
    (tmp_path / "_lock").write_text("my notes")
    with pytest.raises(StoreError, match="did not write"):
        with OutputLock(str(tmp_path), "a test"):
            pass
    assert (tmp_path / "_lock").read_text() == "my notes"


def test_export_has_one_writer_too(made, tmp_path):
    from puma_ray.artifacts.serving import export_for_serving
    from puma_ray.conversion.run import ConvertConfig, convert
    store = tmp_path / "store"
    convert(made["adapter"], [made["source"]], str(store), ConvertConfig(progress=False), log=lambda *_: None)
    serve = tmp_path / "serve"
    with OutputLock(str(serve), "a test export"):
        with pytest.raises(StoreError, match="is being written by pid"):
            export_for_serving(str(store), str(serve))
    assert export_for_serving(str(store), str(serve))["users"] == USERS


def test_s3_lease_refuses_a_live_holder_and_expires_a_dead_one(s3_server, monkeypatch):
    from puma_ray.fs import StorageOptions
    storage = StorageOptions(endpoint_url=s3_server["endpoint_url"], key=s3_server["key"], secret=s3_server["secret"])
    path = f"s3://{s3_server['bucket']}/lock-test/out"
    monkeypatch.setattr(lock_module, "LEASE_RENEW_S", 0.2)
    with OutputLock(path, "a test", storage):
        with pytest.raises(StoreError, match="is being written by pid"):
            OutputLock(path, "a second", storage).__enter__()
        time.sleep(0.6)  # renewals keep a live holder's lease fresh
        monkeypatch.setattr(lock_module, "LEASE_EXPIRY_S", 0.5)
        with pytest.raises(StoreError, match="is being written by pid"):
            OutputLock(path, "a second", storage).__enter__()
    # a dead holder: its lease written once, never renewed
    dead = OutputLock(path, "dead", storage)
    dead.info["renewed_at"] = time.time() - 10
    with dead.fs.open(dead.file, "wb") as f:
        f.write(json.dumps(dead.info).encode())
    with OutputLock(path, "the next run", storage) as taken:  # expired (0.5 s): taken over
        assert taken.info["token"] != dead.info["token"]
    assert not dead.fs.exists(dead.file)


def test_a_migration_into_an_s3_output_being_written_is_refused_first(s3_server):
    """The migration takes the same lease as conversions: into an S3 output another writer holds, it stops with
    one line naming the holder before anything is read, trained or written there."""
    from puma_ray.cli.migrate import migrate
    from puma_ray.fs import StorageOptions, filesystem
    storage = {"endpoint_url": s3_server["endpoint_url"], "key": s3_server["key"], "secret": s3_server["secret"]}
    path = f"s3://{s3_server['bucket']}/lock-test/migration"
    config = {"sources": [{"store": f"{path}/no-such-store"}], "target": {"name": "tiny:qwen2"},
              "data": {"name": "parquet", "paths": {"records": f"{path}/no-such-records.parquet"}},
              "storage": storage}
    with OutputLock(path, "another migration", StorageOptions(**storage)) as holder:
        with pytest.raises(StoreError, match=rf"is being written by pid {os.getpid()}"):
            migrate(config, output=path)
        fs, root = filesystem(path, StorageOptions(**storage))
        assert [os.path.basename(p) for p in fs.find(root)] == [os.path.basename(holder.file)]
