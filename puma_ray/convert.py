"""Apply a fitted adapter to whole source store(s) → a complete target store (in one process).

Single source: streamed shard by shard. Aggregated: the sources are joined on user_id; a user missing from a
source is an error naming the user and the source, unless policy "drop" is configured, in which case the dropped
users are counted in the returned summary and the target manifest (never silently).
The target manifest records the lineage: source stores (with their own lineage: a chain shows as nesting) and the
adapter.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .adapter import PromptAdapter, check_sources
from .store import ModelIdentity, PromptStore, StoreError, StoreWriter

MISSING_POLICIES = ("error", "drop")


@dataclass
class JoinedSources:
    users: np.ndarray  # sorted ids present in every source
    prompts: list[np.ndarray]  # per source, (n, l, d_s) aligned with users
    dropped: dict[str, int]  # source path -> users it lacked (policy "drop")


def join_sources(stores: list[PromptStore], policy: str = "error") -> JoinedSources:
    if policy not in MISSING_POLICIES:
        raise ValueError(f"missing-user policy must be one of {MISSING_POLICIES}, got {policy!r}")
    tables = [s.read_all() for s in stores]
    if len({s.manifest.prompt_length for s in stores}) > 1:
        raise StoreError("aggregated sources must share the prompt length l: "
                         + ", ".join(f"{s.path} l={s.manifest.prompt_length}" for s in stores))
    all_users = np.unique(np.concatenate([ids for ids, _ in tables]))
    common = all_users
    dropped: dict[str, int] = {}
    for store, (ids, _) in zip(stores, tables):
        missing = np.setdiff1d(all_users, ids)
        if len(missing):
            if policy == "error":
                raise StoreError(f"user {missing[0]!r} is missing from source store {store.path} "
                                 f"({len(missing)} user(s) in all); set sources_missing_policy: drop to skip them")
            dropped[store.path] = int(len(missing))
            common = np.intersect1d(common, ids)
    if len(common) == 0:
        raise StoreError("the source stores share no user: nothing to convert ("
                         + ", ".join(s.path for s in stores) + ")")
    aligned = []
    for ids, prompts in tables:
        pos = np.searchsorted(ids, common)
        aligned.append(prompts[pos])
    return JoinedSources(common, aligned, dropped)


@torch.no_grad()
def map_prompts(adapter: PromptAdapter, sources: list[np.ndarray], batch_size: int = 8192) -> np.ndarray:
    adapter.eval()
    out = [adapter(*[torch.from_numpy(np.require(s[i:i + batch_size], requirements="W")) for s in sources]).numpy()
           for i in range(0, len(sources[0]), batch_size)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0, adapter.target_dim), np.float32)


def convert_stores(adapter: PromptAdapter, adapter_config: dict, head, head_cfg: dict, stores: list[PromptStore],
                   target: ModelIdentity, out_path: str, *, template: dict, task: str, adapter_path: str,
                   shard_rows: int = 65_536, storage=None, overwrite: bool = False, policy: str = "error",
                   provenance: dict | None = None) -> dict:
    """Writes the target store; returns a summary (users converted, dropped, wall time, rows/s)."""
    check_sources(adapter_config, [s.identity for s in stores])
    if target.fingerprint != adapter_config["target"]["fingerprint"]:
        raise StoreError(f"adapter was fitted for {adapter_config['target']['name']}, not {target.describe()}")
    start = time.perf_counter()
    lineage = {"kind": "migrated", "adapter": adapter_path,
               "sources": [{"store": s.path, "model": s.manifest.model, "lineage": s.manifest.lineage}
                           for s in stores]}
    writer = StoreWriter(out_path, target, stores[0].manifest.prompt_length, template, task, shard_rows=shard_rows,
                         storage=storage, overwrite=overwrite, lineage=lineage, provenance=provenance)
    dropped: dict[str, int] = {}
    if len(stores) == 1:  # stream: one shard in memory at a time, shard names follow the source's
        for entry in stores[0].manifest.shards:
            ids, prompts = stores[0].read_shard(entry)
            writer.write_shard(ids, map_prompts(adapter, [prompts]), name=entry["name"])
    else:
        joined = join_sources(stores, policy)
        dropped = joined.dropped
        writer.write(joined.users, map_prompts(adapter, joined.prompts))
    writer.lineage["dropped_users"] = dropped
    writer.write_head(head.state_dict(), head_cfg)
    manifest = writer.close()
    wall = time.perf_counter() - start
    return {"store": out_path, "users": manifest.num_users, "dropped": dropped, "wall_s": round(wall, 3),
            "rows_per_s": round(manifest.num_users / wall, 1) if wall > 0 else None}
