"""The JOBS table: every config-driven job, its script, its config class and the config it runs by default.

`jobs/<name>.py` does only: arguments → `JOBS[name].load(...)` → the recipe → print. The shipped configs name
their job on their first line (`# python jobs/<name>.py ...`), and a test loads every one of them through this
table, so a config that no longer fits its job fails in CI, not on a cluster.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from puma_ray.errors import ConfigError
from puma_ray.recipes.runs import load_job_config

# the repository root: configs/ and jobs/ sit beside the package (an editable install, or a Ray job's working_dir)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Job:
    name: str
    config_class: str  # "module:Class", imported when first needed (a job imports only its own recipe)
    default_config: str | None  # repo-relative YAML run with no --config; None: --config is required

    @property
    def script(self) -> str:
        return f"jobs/{self.name}.py"

    def config_cls(self) -> type:
        module, cls = self.config_class.split(":")
        return getattr(importlib.import_module(module), cls)

    def load(self, path: str | None, overrides: list[str] | None = None):
        """The job's config from `path` (or its default file) with `key=value` overrides applied."""
        if path is None:
            if self.default_config is None:
                raise ConfigError(f"{self.script} needs --config (see configs/{self.name}_*.yaml)")
            path = os.path.join(REPO_ROOT, self.default_config)
        return load_job_config(self.config_cls(), path, overrides)


JOBS = {job.name: job for job in (
    Job("migrate", "puma_ray.recipes.migration.config:MigrateJobConfig", "configs/migrate_default.yaml"),
    # the foundation testbed, as migrate's default: a tiny random model's store loses to the per-user mean
    # (1.1839 vs 1.1727 test RMSE), no default should show the weakest system
    Job("train_prompts", "puma_ray.recipes.train_prompts:TrainPromptsJobConfig",
        "configs/train_prompts_ml100k_foundation.yaml"),
    Job("sweep", "puma_ray.recipes.sweep:SweepJobConfig", "configs/sweep_default.yaml"),
    Job("benchmark", "puma_ray.recipes.benchmark:BenchmarkJobConfig", None),
    # a finished migration run's flagged users (or everyone) retrained on the target from their migrated prompt
    Job("repair", "puma_ray.recipes.repair:RepairJobConfig", "configs/repair_default.yaml"),
)}


def job_of_script(script: str) -> Job:
    """The JOBS entry of `jobs/<name>.py` (as a config's first line names it)."""
    name = os.path.splitext(os.path.basename(script))[0]
    if name not in JOBS:
        raise ConfigError(f"{script} is not a config-driven job; known: {sorted(j.script for j in JOBS.values())}")
    return JOBS[name]
