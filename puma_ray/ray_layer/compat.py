"""Every Ray API difference between versions lives here (Ray 2.50 → 2.60 moved several)."""
from __future__ import annotations

import os

import ray


def ray_version() -> tuple[int, int]:
    major, minor = ray.__version__.split(".")[:2]
    return int(major), int(minor)


def actor_pool(size: int):
    """Ray 2.51+ wants compute=ActorPoolStrategy(size=n) (concurrency= is deprecated there)."""
    from ray.data import ActorPoolStrategy
    return {"compute": ActorPoolStrategy(size=size)}


def actor_retries() -> dict:
    """A dead pool actor must be restarted and its task retried. Ray Data defaults both to -1 (unlimited) since
    2.5x; from 2.60 passing them as extra remote args is deprecated, so they are said explicitly only before."""
    if ray_version() >= (2, 60):
        return {}
    return {"max_restarts": -1, "max_task_retries": -1}


def read_parquet_columns(paths, filesystem, columns: list[str]):
    """ray.data.read_parquet of some columns: Ray 2.60 deprecates `columns=` for `.select_columns` (pushed down
    into the read by its optimizer); before, `columns=` is the way."""
    if ray_version() >= (2, 60):
        return ray.data.read_parquet(paths, filesystem=filesystem).select_columns(columns)
    return ray.data.read_parquet(paths, filesystem=filesystem, columns=columns)


def user_error(error: BaseException, kind: type) -> BaseException | None:
    """The user's exception of type `kind` inside the wrappers Ray puts around a task's error (Ray Data:
    RayTaskError with the original as .cause, UserCodeException chaining it as __cause__; Ray Train v2:
    TrainingFailedError / WorkerGroupError holding each rank's error in .worker_failures), or None."""
    seen, stack = set(), [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        failures = getattr(e, "worker_failures", None)
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__,
                      *(failures.values() if isinstance(failures, dict) else [])])
    return None


def train_v2_env() -> dict:
    """Train V2 is the default from 2.5x; silence the migration warnings that V1-style code would trigger."""
    return {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_TRAIN_V2_ENABLED": "1"}


def job_auth_env() -> dict:
    """Ray 2.60 turns token auth on for the job server; a plain local `ray start` + `ray job submit` then fails
    with AuthenticationError unless both sides agree. Local test clusters disable it."""
    return {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}


def tune_report_callback():
    """Ray Train → Tune reporting callback (its import path moved in the V2 API)."""
    from ray.tune.integration.ray_train import TuneReportCallback
    return TuneReportCallback()


def bootstrap_address(address: str) -> str | None:
    """The host:port that ray.init(address) would connect to: "auto" is read from the session file Ray keeps under
    its temp dir (the last `ray start`), a `ray://` client address is its host:port. Ray 2.60 keeps this in a
    private module; None when nothing names a cluster."""
    if address.startswith("ray://"):
        return address[len("ray://"):].split("/")[0]
    from ray._private.services import canonicalize_bootstrap_address
    return canonicalize_bootstrap_address(address)
