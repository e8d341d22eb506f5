"""What a conversion is: its config (from the job's `convert` section) and its plan (the units to run, what the
output is a conversion of). The runner (run.py) builds the plan; the units (units.py) read it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from puma_ray.errors import ConfigError

MISSING_POLICIES = ("error", "reject")


@dataclass
class ConvertConfig:
    actors: int = 2  # Ray actor pool size; one per GPU on a GPU cluster
    cpus_per_actor: float = 0.5  # fractional: actors holding every CPU starve Ray Data's own tasks (a silent hang)
    gpus_per_actor: float = 0.0  # 1 on a GPU cluster: the adapter then runs there
    threads_per_actor: int = 1  # torch threads per actor: actors x threads <= cores, or they thrash
    batch_rows: int = 8192  # rows per adapter forward: bounds activations (8192 x 4096 hidden x 4 B = 128 MB)
    # aggregated: a user absent from one source is an "error", or a counted "reject"
    missing_policy: Literal["error", "reject"] = "error"
    overwrite: bool = False  # replace a finished store, or an interrupted conversion of another adapter/sources
    progress: bool = True  # the rows/s bar on stderr
    # jobs/migrate.py's last stage: "engine" = the actor pool when the engine is Ray; "local" = this process
    # (a demo's thousand users convert in well under a second, less than an actor pool takes to start)
    runs_on: Literal["engine", "local"] = "engine"
    # a prompt whose RMS is beyond this many x the adapter's source scale (either way) goes to the rejects table
    # with its reason instead of being converted; 0 turns the check off (see artifacts/store.PROMPT_SCALE_BOUND)
    max_prompt_scale: float = 100.0

    def __post_init__(self):
        if self.actors < 1:
            raise ConfigError(f"convert.actors must be >= 1, got {self.actors}")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ConfigError("convert.cpus_per_actor must be > 0 and convert.gpus_per_actor >= 0")
        if self.threads_per_actor < 1 or self.batch_rows < 1:
            raise ConfigError("convert.threads_per_actor and convert.batch_rows must be >= 1")
        if not self.max_prompt_scale >= 0:
            raise ConfigError(f"convert.max_prompt_scale must be >= 0 (0: no check), got {self.max_prompt_scale}")


@dataclass
class ConversionPlan:
    adapter: str
    sources: list[str]
    target: str
    identity: dict  # what the output is a conversion of (checked on every rerun)
    units: list[dict]  # {"name", "parts": per source, the shard entries holding the unit's users}
    total_users: int  # every source user, once (the union over sources)
    extra_users: list = field(default_factory=list)  # absent from the first source: rejects/_extra.parquet
    lineage: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def where(self) -> dict:
        return {"adapter": self.adapter, "sources": self.sources, "target": self.target,
                "max_prompt_scale": self.identity.get("max_prompt_scale", 0.0)}
