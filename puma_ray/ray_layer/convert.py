"""Conversion units on a Ray Data actor pool: `run_on_ray` is a `convert.Runner`.

Each row of the dataset is one unit (a source shard's name and the shard entries it needs), never the prompts: an
actor reads its shard straight from storage, converts it and writes the target shard itself, so the tensors never
travel through the object store (a pool that ships prompt blocks through Ray Data ran at ~0.16 of one process,
STACK-NOTES). Actors load the adapter once (on a GPU when `gpus_per_actor` > 0). An actor that dies is restarted
and its unit retried by Ray (the unit rewrites the same deterministic shard); an error in a unit (a corrupt or
mis-shaped source shard) fails the run with that unit's message, before any manifest is written.
"""
from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import ray

from puma_ray.conversion.run import ConversionPlan, ConvertConfig
from puma_ray.conversion.units import UnitConverter
from puma_ray.errors import PumaError
from puma_ray.fs import StorageOptions

from .compat import actor_pool, actor_retries, user_error


class _UnitActor:
    def __init__(self, where: dict, storage: StorageOptions | None, batch_rows: int, threads: int, gpu: bool):
        self.converter = UnitConverter(where, storage, batch_rows, threads, "cuda" if gpu else "cpu")

    def __call__(self, batch: dict) -> dict:
        records = [self.converter(json.loads(unit)) for unit in batch["unit"]]
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def run_on_ray(plan: ConversionPlan, units: list[dict], cfg: ConvertConfig,
               storage: StorageOptions | None = None) -> Iterator[dict]:
    if not units:
        return
    units_ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
    converted = units_ds.map_batches(
        _UnitActor, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs={"where": plan.where(), "storage": storage, "batch_rows": cfg.batch_rows,
                               "threads": cfg.threads_per_actor, "gpu": cfg.gpus_per_actor > 0},
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None,
        **actor_pool(min(cfg.actors, len(units))), **actor_retries())
    try:
        for row in converted.iter_rows():
            yield json.loads(row["record"])
    except Exception as e:  # Ray wraps a unit's error in its own exceptions: surface the unit's message alone
        cause = user_error(e, PumaError)
        if cause is not None:
            raise type(cause)(str(cause)) from e
        raise
