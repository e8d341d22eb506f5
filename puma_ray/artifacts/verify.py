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

from puma_ray.artifacts.formats import CONVERSION_REJECTS_DIR as REJECTS_DIR
from puma_ray.artifacts.formats import sha256_hex
from puma_ray.artifacts.store import MANIFEST, SHARD_DIR, PromptStore, StoreError
from puma_ray.fs import StorageOptions, join


def _first_duplicate(ids: np.ndarray):
    ids = np.sort(ids)
    dup = ids[1:][ids[1:] == ids[:-1]]
    return dup[0] if len(dup) else None


def _rejected_ids(store: PromptStore) -> np.ndarray:
    parts = []
    for entry in store.manifest.lineage.get("rejects", {}).get("files", []):
        where = f"store {store.path} rejects file {entry['name']}"
        data = store.read_listed(REJECTS_DIR, entry, where)
        table = pq.read_table(pa.BufferReader(data))
        if table.num_rows != entry["rows"]:
            raise StoreError(f"{where}: {table.num_rows} rows, manifest says {entry['rows']}")
        parts.append(table.column("user_id").to_numpy(zero_copy_only=False).astype(str))
    return np.concatenate(parts) if parts else np.array([], dtype=str)


def _check_listing(store: PromptStore) -> None:
    """The store's folders hold exactly the files its manifest lists: nothing missing, nothing extra."""
    rejects = (store.manifest.lineage.get("rejects") or {}).get("files", [])
    for sub, listed in ((SHARD_DIR, {e["name"] for e in store.manifest.shards}),
                        (REJECTS_DIR, {e["name"] for e in rejects})):
        folder = join(store.root, sub)
        present = ({p.rstrip("/")[len(folder) + 1:] for p in store.fs.find(folder)} if store.fs.exists(folder)
                   else set())
        extra, missing = sorted(present - listed), sorted(listed - present)
        if extra:
            raise StoreError(f"store {store.path}: {sub}/{extra[0]} is not listed in its {MANIFEST} "
                             f"({len(extra)} such file(s)): a store holds exactly what its manifest lists")
        if missing:
            raise StoreError(f"store {store.path}: {sub}/{missing[0]} is listed in its {MANIFEST} but missing")


def verify_store(path: str, sources: list[str] | None = None, storage: StorageOptions | None = None,
                 model: str | None = None) -> dict:
    """Re-reads the store in full: every shard and rejects file against its checksum and row count, the head
    against its checksum, the folder against the manifest (nothing more, nothing less), the users against the
    sources', and, given `model` (an id or folder), the store's fingerprint against that model's weights."""
    store = PromptStore.open(path, storage)
    _check_listing(store)
    if store.manifest.head_sha256 is None:
        raise StoreError(f"store {path}: its {MANIFEST} has no head checksum (written by an older puma_ray); "
                         "the head cannot be verified")
    store.read_head()
    if model is not None:
        from puma_ray.models.backbone import load_backbone
        store.check_model(load_backbone(model).identity)
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
        # a migrated store: its source stores; a repaired one (conversion/patch.py): its base and its patch
        sources = [s["store"] for s in lineage.get("sources", [])] if lineage.get("kind") in ("migrated",
                                                                                               "repaired") else []
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
            "shards": len(store.manifest.shards), "sources_checked": list(sources), "model_checked": model}
