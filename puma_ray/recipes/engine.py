"""Where a recipe's heavy stages run: the `engine` section picks the executor of a migration (this process, or
Ray) and the fit and conversion functions it hands work to. Ray is imported only in `puma_ray.ray_layer` (and the
Ray executor built on it), and only when the engine is Ray.
"""
from __future__ import annotations

import os

from puma_ray.data import records_in_place
from puma_ray.fs import join
from puma_ray.recipes.migration.executor import Executor
from puma_ray.recipes.migration.in_process import InProcess


def engine_functions(cfg, output: str) -> dict:
    """engine.kind "ray": fits on Ray Train + DeepSpeed, per-user statistics by Ray Data aggregation, conversion
    on a Ray Data actor pool (a local Ray unless an address is known); "local": {} (the library's defaults)."""
    if cfg.engine.kind == "local":
        return {}
    from puma_ray.ray_layer import ensure_ray, make_ray_fit, make_variance_fn, run_on_ray
    ensure_ray(cfg.engine.address, cfg.engine.local_cpus)
    storage_path = cfg.engine.storage_path or join(output, "train")
    name = cfg.engine.run_name or os.path.basename(output.rstrip("/"))
    records = records_in_place(cfg.data, cfg.storage)
    return {"fit_fn": make_ray_fit(cfg.engine, cfg.target, storage_path, cfg.storage, run_name=name),
            "variance_fn": make_variance_fn(records, cfg.storage), "convert_runner": run_on_ray}


def migration_executor(cfg, output: str) -> Executor:
    """InProcess (engine.kind local; or ray with driver full: the driver reads the records and prompts, fits and
    conversion on Ray), or with engine.driver lean the Ray executor (the driver holds per-user rows only). A
    setting the lean driver cannot honour is one line before Ray starts."""
    if cfg.engine.kind == "ray" and cfg.engine.driver == "lean":
        from puma_ray.recipes.migration.on_ray import OnRay, check_lean
        check_lean(cfg)
        functions = engine_functions(cfg, output)
        return OnRay(functions["fit_fn"], functions["convert_runner"])
    return InProcess(**engine_functions(cfg, output))
