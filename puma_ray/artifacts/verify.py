"""`verify_store`: re-reads a store in full and checks it against its manifest and its sources' user sets.

Every shard: present, sha256 as recorded, row count, prompt width l*d, finite values. Every user exactly once over
shards and the rejects table; with sources (by default the ones its lineage names), converted + rejected users are
exactly the sources' users, and the sources are still the ones it was converted from (manifest checksums).
Raises StoreError naming the shard or the user on the first mismatch; returns a summary otherwise.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from puma_ray.artifacts.formats import sha256_hex
from puma_ray.artifacts.store import MANIFEST, PromptStore, StoreError
from puma_ray.fs import StorageOptions, join


def _first_duplicate(ids: np.ndarray):
    ids = np.sort(ids)
    dup = ids[1:][ids[1:] == ids[:-1]]
    return dup[0] if len(dup) else None


def _rejected_ids(store: PromptStore) -> np.ndarray:
    parts = []
    for entry in store.manifest.lineage.get("rejects", {}).get("files", []):
        where = f"store {store.path} rejects file {entry['name']}"
        try:
            with store.fs.open(join(store.root, "rejects", entry["name"]), "rb") as f:
                data = f.read()
        except FileNotFoundError as e:
            raise StoreError(f"{where}: missing") from e
        if sha256_hex(data) != entry["sha256"]:
            raise StoreError(f"{where}: checksum mismatch")
        table = pq.read_table(pa.BufferReader(data))
        if table.num_rows != entry["rows"]:
            raise StoreError(f"{where}: {table.num_rows} rows, manifest says {entry['rows']}")
        parts.append(table.column("user_id").to_numpy(zero_copy_only=False).astype(str))
    return np.concatenate(parts) if parts else np.array([], dtype=str)


def verify_store(path: str, sources: list[str] | None = None, storage: StorageOptions | None = None) -> dict:
    store = PromptStore.open(path, storage)
    converted = np.concatenate([store.read_shard(e)[0] for e in store.manifest.shards] or [np.array([], str)])
    if len(converted) != store.manifest.num_users:
        raise StoreError(f"store {path}: {len(converted)} users in shards, manifest says {store.manifest.num_users}")
    rejected = _rejected_ids(store)
    everyone = np.concatenate([converted, rejected]).astype(str)
    dup = _first_duplicate(everyone)
    if dup is not None:
        where = "both converted and rejected" if dup in set(rejected.tolist()) else "more than once"
        raise StoreError(f"store {path}: user {str(dup)!r} appears {where}")
    lineage = store.manifest.lineage
    if sources is None:
        sources = [s["store"] for s in lineage.get("sources", [])] if lineage.get("kind") == "migrated" else []
    recorded = {s["store"]: s["manifest_sha256"] for s in lineage.get("conversion", {}).get("sources", [])}
    source_ids = []
    for src_path in sources:
        src = PromptStore.open(src_path, storage)
        with src.fs.open(join(src.root, MANIFEST), "rb") as f:
            sha = sha256_hex(f.read())
        if src_path in recorded and recorded[src_path] != sha:
            raise StoreError(f"store {path}: source store {src_path} changed since the conversion "
                             "(its manifest checksum differs): the target is stale")
        source_ids.append(np.concatenate([src.read_user_ids(e) for e in src.manifest.shards] or [np.array([], str)]))
    if sources:
        expected = np.unique(np.concatenate(source_ids).astype(str))
        missing = np.setdiff1d(expected, everyone)
        if len(missing):
            raise StoreError(f"store {path}: source user {str(missing[0])!r} is neither converted nor rejected "
                             f"({len(missing)} user(s) in all)")
        extra = np.setdiff1d(everyone, expected)
        if len(extra):
            raise StoreError(f"store {path}: user {str(extra[0])!r} is in no source store "
                             f"({len(extra)} user(s) in all)")
    return {"store": path, "users": int(len(converted)), "rejected": int(len(rejected)),
            "shards": len(store.manifest.shards), "sources_checked": list(sources)}
