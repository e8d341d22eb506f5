"""Where a recipe's heavy stages run: the `engine` section picks the local runners (this process) or the Ray ones.

`engine_functions(cfg, output)` returns the keyword arguments `migrate.run` (and the benchmark, per migration)
takes: `fit_fn` (the adapter fit), `variance_fn` (per-user label statistics), `convert_runner` (the conversion's
units). Empty for engine.kind "local": the recipes' own in-process defaults. Ray is imported only here and in
`puma_ray.ray_layer`, and only when the engine is Ray.
"""
from __future__ import annotations

import os

from puma_ray.data import records_in_place
from puma_ray.fs import join


def migration_runner(cfg):
    """recipes.migrate.run, or with engine.driver lean (engine.kind ray) the Ray layer's lean-driver migration:
    the same stages and report, the driver holding per-user rows only (ray_layer/lean_migrate.py)."""
    if cfg.engine.kind == "ray" and cfg.engine.driver == "lean":
        from puma_ray.ray_layer.lean_migrate import check_lean, run_lean
        check_lean(cfg)
        return run_lean
    from puma_ray.recipes.migrate import run
    return run


def engine_functions(cfg, output: str) -> dict:
    """engine.kind "ray": fits on Ray Train + DeepSpeed, per-user statistics by Ray Data aggregation, conversion
    on a Ray Data actor pool (a local Ray unless an address is known); "local": the library's defaults, here."""
    if cfg.engine.kind == "local":
        return {}
    from puma_ray.ray_layer import ensure_ray, make_ray_fit, make_variance_fn, run_on_ray
    ensure_ray(cfg.engine.address, cfg.engine.local_cpus)
    storage_path = cfg.engine.storage_path or join(output, "train")
    name = cfg.engine.run_name or os.path.basename(output.rstrip("/"))
    records = records_in_place(cfg.data, cfg.storage)
    return {"fit_fn": make_ray_fit(cfg.engine, cfg.target, storage_path, cfg.storage, run_name=name),
            "variance_fn": make_variance_fn(records, cfg.storage), "convert_runner": run_on_ray}
