"""A synthetic source store and a random adapter for it, with no language model involved: what conversion tests
and the conversion benchmark need (conversion never runs the LLM). Written shard by shard, so 1M users x 576
dims never sit in memory at once; deterministic per seed.
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from puma_ray.artifacts.adapter_io import save_adapter
from puma_ray.artifacts.store import StoreWriter
from puma_ray.models.adapter import AdapterConfig, PromptAdapter
from puma_ray.models.heads import RatingHead, head_config
from puma_ray.models.identity import ModelIdentity

TEMPLATE = {"text": "synthetic"}  # stored as the store's template; conversion copies it, never reads it


def synthetic_identity(name: str, hidden_size: int) -> ModelIdentity:
    fingerprint = (name.encode().hex() * 64)[:64]  # stable, distinct per name: stands in for a weight hash
    return ModelIdentity(name=name, family="synthetic", hidden_size=hidden_size, fingerprint=fingerprint)


def write_synthetic_store(path: str, users: int, prompt_length: int, dim: int, shard_rows: int, seed: int = 0,
                          model_name: str = "synthetic-source", storage=None, overwrite: bool = False) -> str:
    identity = synthetic_identity(model_name, dim)
    writer = StoreWriter(path, identity, prompt_length, TEMPLATE, "rating", shard_rows=shard_rows, storage=storage,
                         overwrite=overwrite, lineage={"kind": "trained", "data": "synthetic", "seed": seed})
    for start in range(0, users, shard_rows):
        n = min(shard_rows, users - start)
        rng = np.random.default_rng([seed, start])
        ids = np.array([f"user{i:08d}" for i in range(start, start + n)])
        writer.write_shard(ids, rng.normal(0, 1, (n, prompt_length, dim)).astype(np.float32))
    head = RatingHead()
    writer.write_head(head.state_dict(), head_config("rating", head))
    writer.close()
    return path


def write_synthetic_adapter(path: str, source_dims: list[int], target_dim: int, prompt_length: int,
                            hidden: int | None = None, seed: int = 0, source_names: list[str] | None = None,
                            target_name: str = "synthetic-target", storage=None) -> str:
    torch.manual_seed(seed)
    names = source_names or (["synthetic-source"] if len(source_dims) == 1
                             else [f"synthetic-source-{i}" for i in range(len(source_dims))])
    adapter = PromptAdapter(source_dims, target_dim, AdapterConfig(hidden=hidden))
    head = RatingHead()
    meta = {"sources": [asdict(synthetic_identity(n, d)) for n, d in zip(names, source_dims)],
            "target": asdict(synthetic_identity(target_name, target_dim)), "prompt_length": prompt_length,
            "task": "rating", "provenance": {"made_by": "puma_ray.tools.synthetic_prompts", "seed": seed}}
    return save_adapter(path, adapter, head, head_config("rating", head), meta, storage)
