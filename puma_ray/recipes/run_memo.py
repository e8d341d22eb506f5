"""Which finished migration answers to a config: the benchmark's memo (every run is keyed by what it computes, so a
rerun into the same output folder reuses what already finished instead of fitting it again).

A key is a sha256 of the migration config without the execution-only fields, with the output folder written as
`{output}`. A finished run's report answers to a key by the key it recorded (hashed, or the config JSON itself in
reports written before keys were hashed) or by its own config (its provenance) read through today's schema, where
a field added since it ran takes its default: defaults keep earlier behaviour, so a new option is no reason to
refit every finished run. Reports are untrusted input: JSON only, and a config the schema refuses matches nothing.
"""
from __future__ import annotations

import json
import os

from puma_ray.artifacts.formats import sha256_hex
from puma_ray.config import ConfigError, from_dict, to_dict
from puma_ray.fs import filesystem, join
from puma_ray.recipes.migration import MigrateJobConfig

# config fields that change how a run executes, not what it computes: two runs differing only here are the same run
# (`threads`, the storage endpoint and its credentials: a key must never carry a secret into a report)
_EXECUTION_ONLY = ("threads", "storage")


def run_key(config: dict, output: str) -> str:
    """A migration's memo key: sha256 of its config (plain form) without the execution-only fields, with the
    benchmark's own output folder written as `{output}`, so that `--output runs/b` and its absolute path, or another
    `threads`, reuse the same finished runs."""
    body = {k: v for k, v in config.items() if k not in _EXECUTION_ONLY}
    text = json.dumps(body, sort_keys=True, default=str)
    for prefix in sorted({output.rstrip("/"), os.path.abspath(output)} if "://" not in output else {output.rstrip("/")},
                         key=len, reverse=True):
        text = text.replace(json.dumps(prefix)[1:-1] + "/", "{output}/")
    return "sha256:" + sha256_hex(text.encode())


def recorded_key(report: dict, output: str) -> str | None:
    """The memo key a finished run's report holds; reports written before keys were hashed hold the config's JSON
    itself, which is keyed the same way here (so those runs are reused, not refitted)."""
    key = report.get("benchmark_key")
    if not isinstance(key, str) or key.startswith("sha256:"):
        return key
    try:
        return run_key(json.loads(key), output)
    except (ValueError, AttributeError):
        return None


def _schema_key(report: dict, output: str) -> str | None:
    """The key of the run's own config read through today's schema (new fields at their defaults)."""
    config = (report.get("provenance") or {}).get("config")
    if not isinstance(config, dict):
        return None
    try:
        return run_key(to_dict(from_dict(MigrateJobConfig, config, "a finished run's config")), output)
    except (ConfigError, TypeError, ValueError):
        return None


def read_finished(run_dir: str, key: str, output: str, storage=None) -> dict | None:
    """The finished run in `run_dir` when its report answers to `key`; None when there is none or it is another
    run's (which the caller then runs again)."""
    fs, root = filesystem(join(run_dir, "report.json"), storage)
    if not fs.exists(root):
        return None
    with fs.open(root) as f:
        report = json.load(f)
    return report if key in (recorded_key(report, output), _schema_key(report, output)) else None
