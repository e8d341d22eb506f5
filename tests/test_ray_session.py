"""A job's Ray is private unless it is told to join one (issue 28): a bare `ray.init()` joins whatever head the
machine's session file names, so a job died with someone else's `ray start` head, or hung for minutes on a stale
session file. Each test runs the job in its own process with its own RAY_TMPDIR (where Ray keeps that file)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = [sys.executable, os.path.join(REPO, "scripts", "ray_local.py")]
pytestmark = pytest.mark.timeout(240)

# the job: a private Ray (no address), its GCS address, then (once `go` exists) one task on it
JOB = """
import os, sys, time
import ray
from puma_ray.ray_layer import ensure_ray
ensure_ray(num_cpus=1)
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
go = sys.argv[1]
while go and not os.path.exists(go):
    time.sleep(0.2)
print("TASK", ray.get(ray.remote(lambda: 41 + 1).options(num_cpus=0.1).remote()), flush=True)
"""


def _env(ray_tmp: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": REPO, **extra}


def _closed_port() -> int:
    with socket.socket() as s:  # bound then released: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_tmp():
    path = f"/tmp/prs-{os.getpid()}-{time.monotonic_ns() % 10**6}"  # short: Ray's socket paths < 107 chars
    os.makedirs(os.path.join(path, "ray"))
    yield path


@pytest.mark.slow  # a `ray start` head (with its dashboard) beside a private Ray: ~1-2 min on 2 shared cores
def test_private_ray_beside_a_running_head_outlives_it(ray_tmp):
    """A head from `ray start` (the README's scripts/ray_local.py) records itself in the session file this job's
    Ray would read: the job must start its own cluster, and finish after that head is stopped."""
    # the head's own temp dir (`stop` kills what names it: the job's Ray must not), its address in the session
    # file where the job's Ray looks (on a machine both are /tmp/ray)
    head_dir = ray_tmp + "h"
    env = _env(ray_tmp)
    subprocess.run([*SCRIPT, "start", "--temp-dir", head_dir, "--num-cpus", "1"], check=True, capture_output=True,
                   env=env, timeout=120)
    stopped = False
    try:
        with open(os.path.join(head_dir, "ray_current_cluster")) as f:
            head_gcs = f.read().strip()
        with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write(head_gcs)
        go = os.path.join(ray_tmp, "go")
        job = subprocess.Popen([sys.executable, "-c", JOB, go], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        line = job.stdout.readline()
        assert line.startswith("GCS "), line + job.stderr.read()[-3000:]
        assert line.split()[1] != head_gcs, "the job joined the other head instead of starting a private Ray"
        subprocess.run([*SCRIPT, "stop", "--temp-dir", head_dir], check=True, capture_output=True, env=env,
                       timeout=60)
        stopped = True
        open(go, "w").close()
        out, err = job.communicate(timeout=120)
        assert job.returncode == 0, err[-3000:]
        assert "TASK 42" in out
    finally:
        if not stopped:
            subprocess.run([*SCRIPT, "stop", "--temp-dir", head_dir], capture_output=True, env=env, timeout=60)


def test_stale_session_file_does_not_stop_a_private_ray(ray_tmp):
    """The session file names a stopped head: a job with no address never looks at it (it hung > 300 s)."""
    with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as f:
        f.write(f"127.0.0.1:{_closed_port()}")
    done = subprocess.run([sys.executable, "-c", JOB, ""], env=_env(ray_tmp), capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TASK 42" in done.stdout


@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS", "auto"])
def test_unreachable_cluster_is_one_line_within_seconds(ray_tmp, how):
    """Told to join a head that is not there (an address, RAY_ADDRESS, or "auto" read from a stale session file):
    one `error:` line naming the address, exit 2, in seconds, and no Ray started."""
    port = _closed_port()
    address = f"127.0.0.1:{port}"
    with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as f:
        f.write(address)
    args = ["--address", address if how == "--address" else "auto"] if how != "RAY_ADDRESS" else []
    env = _env(ray_tmp, **({"RAY_ADDRESS": address} if how == "RAY_ADDRESS" else {}))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "jobs", "convert.py"), "--adapter", "a", "--source",
                             "s", "--output", os.path.join(ray_tmp, "out"), "--engine", "ray", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own process group only
        proc.communicate()
        pytest.fail(f"joining the unreachable {address} did not end within 60 s")
    wall = time.perf_counter() - start
    assert proc.returncode == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(port) in lines[0], err[-3000:]
    assert wall < 30, f"{wall:.1f} s"


def test_deepspeed_ops_folder_is_this_environments_own(monkeypatch):
    """DeepSpeed's JIT op is kept per environment (a shared folder made venvs rebuild it in turn, 40-370 s inside a
    fit's start-up); a user's own TORCH_EXTENSIONS_DIR wins; importing the Ray layer sets it for Ray's workers."""
    import sys

    from puma_ray.tools import deepspeed_ops
    mine = deepspeed_ops.extensions_dir()
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    assert deepspeed_ops.extensions_dir() != mine and os.path.dirname(deepspeed_ops.extensions_dir()) == \
        os.path.dirname(mine)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/users/own/choice")
    deepspeed_ops.use_own_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/users/own/choice"
    monkeypatch.undo()
    import puma_ray.ray_layer  # noqa: F401  (set at import, before any Ray process starts)
    assert os.environ["TORCH_EXTENSIONS_DIR"] == mine
