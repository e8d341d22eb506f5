"""PUMA on Ray: carry per-user soft prompts over to a new foundation LLM with one learned adapter.

The core (stores, backbones, prompts, adapter, selection, metrics) runs in a plain process and imports no Ray;
`puma_ray.ray_layer` puts it on a cluster.
"""
__version__ = "0.1.0"
