"""The Ray layer: the only part of puma_ray that imports Ray. Public surface:

    ensure_ray(address)            connect to a cluster, or start a local Ray in-process
    make_ray_fit(engine, model)    a fit function with fit.fit_mapping's signature that runs on Ray Train + DeepSpeed
    user_statistics(...)           per-user counts / label variance by streaming aggregation over Ray Data
"""
from .session import ensure_ray
from .train import make_ray_fit

__all__ = ["ensure_ray", "make_ray_fit"]
