"""The Ray layer: the only part of puma_ray that imports Ray. Public surface:

    ensure_ray(address)            connect to a cluster, or start a local Ray in-process
    make_ray_fit(engine, model)    a fit function with fit.fit_mapping's signature that runs on Ray Train + DeepSpeed
    make_variance_fn(records)      per-user label variance by streaming aggregation over Ray Data
    run_on_ray                     a convert.Runner: conversion units on a Ray Data actor pool
"""
from .convert import run_on_ray
from .data import make_variance_fn, per_user_label_stats, read_records
from .session import ensure_ray
from .train import make_ray_fit

__all__ = ["run_on_ray", "ensure_ray", "make_ray_fit", "make_variance_fn", "per_user_label_stats", "read_records"]
