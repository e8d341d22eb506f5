"""The Ray layer: the only part of puma_ray that imports Ray. Public surface:

    ensure_ray(address)            connect to a cluster, or start a local Ray in-process
    make_ray_fit(engine, model)    a fit function with fit.fit_mapping's signature that runs on Ray Train + DeepSpeed
    make_variance_fn(records)      per-user label variance by streaming aggregation over Ray Data
    run_on_ray                     a convert.Runner: conversion units on a Ray Data actor pool
"""
import os

# Before Ray is imported (it reads this once, at import): Ray's C++ failure-signal handler turns a SIGTERM of the
# driver into a stack dump and SIGABRT (exit -6), so a scheduler's `kill` never reached the job's own handler (one
# `interrupted:` line, exit 130, Ray shut down). Crashes still raise Python errors; only the C++ dump goes.
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")

from puma_ray.tools.deepspeed_ops import use_own_extensions_dir  # noqa: E402

use_own_extensions_dir()  # inherited by the local Ray's workers: DeepSpeed's CPU op is built once per environment

from .convert import run_on_ray  # noqa: E402
from .data import make_variance_fn, per_user_label_stats, read_records  # noqa: E402
from .session import ensure_ray  # noqa: E402
from .train import make_ray_fit  # noqa: E402

__all__ = ["run_on_ray", "ensure_ray", "make_ray_fit", "make_variance_fn", "per_user_label_stats", "read_records"]
