"""A local Ray head to try `ray job submit` with, using this checkout's virtualenv (README "A local Ray cluster").

    .venv/bin/python scripts/ray_local.py start                  # a head on 127.0.0.1, its own temp dir and ports
    .venv/bin/python scripts/ray_local.py submit -- jobs/migrate.py --output runs/submitted   # waits, streams logs
    .venv/bin/python scripts/ray_local.py stop                   # stops the processes of this head, no other Ray

Why a script and not the three `ray` commands: the job's entrypoint must be the venv's python (a bare `python`
from a shell without the venv is the system one: `No module named 'torch'`); Ray 2.60's job server asks for a
token by default (`AuthenticationError`), so this head binds loopback only and runs with `RAY_AUTH_MODE=disabled`;
a leftover agent on a default port makes submissions fail with "No available agent", so every port is free-picked;
and `ray stop` would stop every Ray cluster on the machine. The head's address, ports and temp dir are written to
`<temp dir>/puma_head.json`; `submit` and `stop` read it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(os.path.abspath(sys.executable))  # the venv this script runs in: its ray and its python
DEFAULT_TEMP_DIR = "/tmp/puma-ray-head"  # short: Ray's unix socket paths must stay under 107 characters
STATE = "puma_head.json"
# forwarded to the job when set here: model cache, offline hub, S3 credentials, DeepSpeed on CPU
FORWARDED_ENV = ("PUMA_MODEL_CACHE", "HF_HUB_OFFLINE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR",
                 "PUMA_RAY_LOG_TO_DRIVER")


def _env() -> dict:
    # loopback only, so no token: the job server of Ray 2.60 wants one unless auth is off for start *and* submit
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(temp_dir: str) -> dict:
    path = os.path.join(temp_dir, STATE)
    if not os.path.exists(path):
        sys.exit(f"error: no head started from here ({path} missing): run `scripts/ray_local.py start` first")
    with open(path) as f:
        return json.load(f)


def start(temp_dir: str, num_cpus: int) -> int:
    if os.path.exists(os.path.join(temp_dir, STATE)):
        print(f"a head is already running from {temp_dir}: {_state(temp_dir)['address']}")
        return 0
    ports = {"port": _free_port(), "dashboard-port": _free_port(), "dashboard-agent-listen-port": _free_port(),
             "ray-client-server-port": _free_port()}
    cmd = [os.path.join(BIN, "ray"), "start", "--head", f"--num-cpus={num_cpus}", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           *(f"--{k}={v}" for k, v in ports.items())]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if done.returncode:
        print(done.stdout[-2000:] + done.stderr[-2000:], file=sys.stderr)
        return done.returncode
    state = {"address": f"http://127.0.0.1:{ports['dashboard-port']}", "temp_dir": temp_dir, **ports}
    with open(os.path.join(temp_dir, STATE), "w") as f:
        json.dump(state, f)
    print(f"Ray head started: {state['address']} (dashboard and job server), temp dir {temp_dir}")
    return 0


def submit(temp_dir: str, job: list[str], no_wait: bool) -> int:
    state = _state(temp_dir)
    if not job:
        sys.exit("error: name the job after --, e.g. `submit -- jobs/migrate.py --output runs/submitted`")
    runtime_env = {"working_dir": REPO, "excludes": [".venv", "runs", "models", ".git", "__pycache__"],
                   "env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    cmd = [os.path.join(BIN, "ray"), "job", "submit", "--address", state["address"],
           "--runtime-env-json", json.dumps(runtime_env), *(["--no-wait"] if no_wait else []),
           "--", sys.executable, *job]
    for _ in range(30):  # the head's job agent comes up a few seconds after `ray start` returns
        # streamed as it comes (`ray job submit` follows the job's logs until it ends), and kept to spot a retry
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "No available agent" not in line:
                print(line, end="", flush=True)
        if proc.wait() == 0 or not any("No available agent" in line for line in seen):
            return proc.returncode
        time.sleep(2)
    print("error: the head's job agent did not come up within a minute", file=sys.stderr)
    return 1


def stop(temp_dir: str) -> int:
    """Kills the processes of this head only: those naming its temp dir or client port, and their children
    (the dashboard agent retitles itself "ray::DashboardAgent")."""
    import psutil
    state = _state(temp_dir)
    me = {psutil.Process().pid, *(p.pid for p in psutil.Process().parents())}  # this command names the dir too
    ours = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid in me:
            continue
        try:
            if any(temp_dir in part or f"={state['ray-client-server-port']}" in part
                   for part in proc.info["cmdline"] or []):
                ours.add(proc)
                ours.update(c for c in proc.children(recursive=True) if c.pid not in me)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for proc in ours:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(ours), timeout=10)
    os.remove(os.path.join(temp_dir, STATE))  # ours; Ray's session files stay (its own cleanup, not ours)
    print(f"Ray head stopped ({len(ours)} processes)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["start", "submit", "stop"])
    ap.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR, help=f"the head's temp dir (default {DEFAULT_TEMP_DIR})")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs the head offers (start)")
    ap.add_argument("--no-wait", action="store_true", help="submit: return at once (follow with `ray job logs -f`)")
    ap.epilog = "submit: everything after -- is the job: <script> [args], run with this venv's python"
    argv = list(sys.argv[1:] if argv is None else argv)
    job = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.command == "start":
        return start(args.temp_dir, args.num_cpus)
    if args.command == "submit":
        return submit(args.temp_dir, job, args.no_wait)
    return stop(args.temp_dir)


if __name__ == "__main__":
    sys.exit(main())
