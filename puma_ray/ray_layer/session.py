"""Connecting to Ray: a running cluster (address, or RAY_ADDRESS as `ray job submit` sets it) or a local Ray
started in-process, so `python jobs/migrate.py` works on a laptop and unchanged under `ray job submit`."""
from __future__ import annotations

import logging
import os

import ray

from .compat import train_v2_env


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


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> dict:
    for key, value in train_v2_env().items():
        os.environ.setdefault(key, value)
    quiet_data()
    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS")
    # a job routes the libraries' chatter to its log file (recipes/runs.library_logs_to_file): then Ray's worker
    # processes keep their output in Ray's session logs instead of echoing it to this console
    log_to_driver = os.environ.get("PUMA_RAY_LOG_TO_DRIVER", "1") != "0"
    # no runtime_env here: under `ray job submit` the job's runtime env applies (passing one too is an error),
    # and a local Ray's workers inherit this process's environment (PUMA_*, HF_*, DS_*, AWS_* included)
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, configure_logging=log_to_driver)
    else:  # no dashboard: starts in ~4 s and ~0.9 GB instead of ~8 s and ~1.9 GB
        # this process's private cluster has no dashboard, no job server and no client port: token auth guards
        # nothing here, and its node processes would print Ray 2.60's token-auth notice on the user's console
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                 configure_logging=log_to_driver)  # False: Ray keeps the handlers the job set (its log file)
    return ray.cluster_resources()
