"""PUMA on Ray: carry per-user soft prompts over to a new foundation LLM with one learned adapter.

The core (stores, backbones, prompts, adapter, selection, metrics) runs in a plain process and imports no Ray;
`puma_ray.ray_layer` puts it on a cluster.
"""
import os as _os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. Measured on 2 cores with another busy
# process: a tiny model's step took 0.94 s on 2 spinning threads, 0.18 s passive, 0.13 s on one thread.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
