"""Connecting to Ray: a cluster the job was told to join (engine.address / --address, or RAY_ADDRESS, which
`ray job submit` sets for its entrypoint) or else a private Ray started in-process, so `python jobs/migrate.py`
works on a laptop and unchanged under `ray job submit`.

Private means `address="local"`: a bare `ray.init()` joins whatever head the machine's Ray session file names (a
`ray start` of someone else's, or a stopped one: the job then died with that head, or hung for minutes printing
connection warnings). A cluster we are told to join is checked first: unreachable is one line within seconds.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading

import ray

from puma_ray.errors import ClusterError

from .compat import bootstrap_address, train_v2_env

# Why 5 s: a reachable head answers a TCP connect in milliseconds, even across a data centre; a stopped or
# firewalled one never does, and the user should hear so in seconds, not after Ray's minutes of retries.
CONNECT_TIMEOUT_S = 5.0


def quiet_data(progress_bars: bool = False) -> None:
    """Ray Data's per-operator progress bars flood job logs of small datasets; conversion turns them back on."""
    from ray.data import DataContext
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    progress = logging.getLogger("ray.data._internal.progress")  # a filter acts on its own logger's records only
    if not any(isinstance(f, _OurChoice) for f in progress.filters):
        progress.addFilter(_OurChoice())


class _OurChoice(logging.Filter):
    """Drops Ray Data's warning that progress bars are off: we turned them off, it tells the user nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars")


def cluster_to_join(address: str | None) -> str | None:
    """The address to join, or None for a private local Ray: the one given, else RAY_ADDRESS (set by `ray job
    submit` for its entrypoint, or by the user); never the session file alone ("local" also means private)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """One ClusterError line naming `address` unless its head answers a TCP connect within `timeout_s`."""
    try:
        target = bootstrap_address(address)
    except Exception as e:  # "auto" with no session file, a malformed address: Ray's own words, on one line
        raise ClusterError(f"cannot join Ray cluster {address!r}: {str(e).splitlines()[0] if str(e) else e!r}; "
                           "give a running head's address, or none for a private local Ray") from None
    if not target:
        raise ClusterError(f"cannot join Ray cluster {address!r}: no running head is recorded on this machine; "
                           "give a running head's address, or none for a private local Ray")
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        via = "" if target == address else f" (resolved to {target})"
        raise ClusterError(f"cannot join Ray cluster {address!r}{via}: no answer within {timeout_s:g} s "
                           f"({type(e).__name__}: {e}); is the head running? Without an address (and RAY_ADDRESS "
                           "unset) the job starts a private local Ray") from None


def ensure_ray(address: str | None = None, num_cpus: int | None = None,
               connect_timeout_s: float = CONNECT_TIMEOUT_S) -> dict:
    for key, value in train_v2_env().items():
        os.environ.setdefault(key, value)
    quiet_data()
    if ray.is_initialized():
        return ray.cluster_resources()
    address = cluster_to_join(address)
    # a job routes the libraries' chatter to its log file (recipes/runs.library_logs_to_file): then Ray's worker
    # processes keep their output in Ray's session logs instead of echoing it to this console
    log_to_driver = os.environ.get("PUMA_RAY_LOG_TO_DRIVER", "1") != "0"
    # no runtime_env here: under `ray job submit` the job's runtime env applies (passing one too is an error),
    # and a local Ray's workers inherit this process's environment (PUMA_*, HF_*, DS_*, AWS_* included)
    # ray.init replaces SIGTERM's handler with its own sys.exit (exit 1 through Ray Train's wait): the process's
    # handler (a job's: one `interrupted:` line, exit 130, Ray shut down on the way out) is put back after it
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if address:
            check_reachable(address, connect_timeout_s)
            ray.init(address=address, log_to_driver=log_to_driver, configure_logging=log_to_driver)
        else:  # "local": a new private cluster, whatever the session file names
            # no dashboard: starts in ~4 s and ~0.9 GB instead of ~8 s and ~1.9 GB
            # this process's private cluster has no dashboard, no job server and no client port: token auth guards
            # nothing here, and its node processes would print Ray 2.60's token-auth notice on the user's console
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                     configure_logging=log_to_driver)  # False: Ray keeps the handlers the job set (its log file)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return ray.cluster_resources()
