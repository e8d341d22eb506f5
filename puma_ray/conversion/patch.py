"""A new version of a store with some users' prompts replaced (repair and polish, recipes/repair.py), written by
the conversion's exactly-once machinery (units.py): the same output state, resume and manifest-last rule.

The replacement prompts arrive as a store of their own (the patch: written by StoreWriter, manifest last, every
shard checksummed), bound to the same model as the base. The work is one unit per shard of the base: a unit
reads its base shard, swaps in the patch's rows of the users it holds, writes `shards/<name>`, then
`_progress/<name>.json` LAST; a rerun skips units with a record. `finalize_patch` checks that every base user is
in exactly one output shard (no user added or lost), writes the patch's head (the polished head; in a repair the
base's, unchanged) and the manifest, whose lineage (kind "repaired") names the base and the patch by manifest
checksum: `jobs/convert.py --verify` re-reads the new version against both.
"""
from __future__ import annotations

import resource
import time
from dataclasses import asdict

import numpy as np
import pandas as pd

from puma_ray import __version__
from puma_ray.artifacts.formats import sha256_hex
from puma_ray.artifacts.lock import OutputLock
from puma_ray.artifacts.store import (
    HEAD,
    MANIFEST,
    SHARD_DIR,
    Manifest,
    PromptStore,
    StoreError,
    encode_head,
    encode_shard,
    write_manifest,
)
from puma_ray.artifacts.store_index import StoreIndex
from puma_ray.conversion.plan import ConversionPlan, ConvertConfig
from puma_ray.conversion.units import (
    PROGRESS_DIR,
    check_exactly_once,
    check_output_location,
    prepare_output,
    read_bytes,
)
from puma_ray.fs import StorageOptions, filesystem, join, plain_name, write_file, write_json

PATCH_FORMAT = "puma_ray.store-patch/1"


def _manifest_sha(store: PromptStore) -> str:
    return sha256_hex(read_bytes(store.fs, join(store.root, MANIFEST)))


def plan_patch(base_path: str, patch_path: str, target_path: str, storage: StorageOptions | None = None,
               provenance: dict | None = None, lineage: dict | None = None) -> ConversionPlan:
    """Checks what can be checked before writing (same model and prompt shape; every patched user is a base
    user) and cuts the work into one unit per base shard."""
    base, patch = PromptStore.open(base_path, storage), PromptStore.open(patch_path, storage)
    if base.identity.fingerprint != patch.identity.fingerprint or base.prompt_shape != patch.prompt_shape:
        raise StoreError(f"patch {patch_path} ({patch.identity.describe()}, (l, d) {patch.prompt_shape}) does not "
                         f"fit store {base_path} ({base.identity.describe()}, (l, d) {base.prompt_shape})")
    base_ids, patch_ids = StoreIndex(base).users, StoreIndex(patch).users
    stranger = np.setdiff1d(patch_ids, base_ids)
    if len(stranger):
        raise StoreError(f"patch {patch_path}: user {str(stranger[0])!r} is not in store {base_path} "
                         f"({len(stranger)} user(s) in all)")
    sources = [{"store": s.path, "manifest_sha256": _manifest_sha(s)} for s in (base, patch)]
    identity = {"format": PATCH_FORMAT, "adapter": None, "sources": sources, "puma_ray": __version__}
    full_lineage = {"kind": "repaired", "base": base_path, "patch": patch_path, "patched_users": int(len(patch_ids)),
                    "sources": [{"store": s.path, "model": s.manifest.model, "lineage": s.manifest.lineage}
                                for s in (base, patch)],
                    "base_rejects": base.manifest.lineage.get("rejects", {}), **(lineage or {})}
    units = [{"name": e["name"], "parts": [[e]]} for e in base.manifest.shards]
    # ConversionPlan's `adapter` slot names the patch: the output may not sit in it (check_output_location)
    return ConversionPlan(patch_path, [base_path], target_path, identity, units, base.manifest.num_users, [],
                          full_lineage, provenance or {})


class PatchUnit:
    """Opens the base and the patch once, then writes units (one base shard each)."""

    def __init__(self, plan: ConversionPlan, storage: StorageOptions | None):
        self.base = PromptStore.open(plan.sources[0], storage)
        self.patch = StoreIndex(PromptStore.open(plan.adapter, storage))
        self.fs, self.root = filesystem(plan.target, storage)

    def __call__(self, unit: dict) -> dict:
        started, name = time.time(), plain_name(unit["name"], "patch unit", StoreError)
        ids, prompts = self.base.read_shard(unit["parts"][0][0])
        hit = self.patch.has(ids)
        if hit.any():
            prompts = prompts.copy()
            prompts[hit] = self.patch.rows(ids[hit])
        data, sha = encode_shard(ids, prompts)
        write_file(self.fs, join(self.root, SHARD_DIR, name), data)
        record = {"name": name, "rows": int(len(ids)), "bytes": len(data), "sha256": sha,
                  "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "source_rows": int(len(ids)), "patched_rows": int(hit.sum()), "rejects": 0,
                  "rejects_sha256": None, "reasons": {}, "started_at": started, "finished_at": time.time()}
        # last, atomically: marks the unit done (a kill before it leaves the unit to be redone)
        write_json(self.fs, join(self.root, PROGRESS_DIR, name + ".json"), record, indent=None)
        return record


def finalize_patch(plan: ConversionPlan, records: list[dict], storage: StorageOptions | None = None) -> Manifest:
    """Every base user exactly once over the output shards, then the patch's head and the manifest (last)."""
    fs, root = filesystem(plan.target, storage)
    by_name = {r["name"]: r for r in records}
    missing = [u["name"] for u in plan.units if u["name"] not in by_name]
    if missing:
        raise StoreError(f"{plan.target}: unit {missing[0]} has no result ({len(missing)} in all); no manifest")
    ordered = [by_name[u["name"]] for u in plan.units]
    check_exactly_once(fs, [join(root, SHARD_DIR, r["name"]) for r in ordered], [], plan.total_users,
                       f"new version {plan.target}")
    patched = sum(r.get("patched_rows", 0) for r in ordered)
    if patched != plan.lineage["patched_users"]:
        raise StoreError(f"{plan.target}: {patched} rows patched, the patch holds {plan.lineage['patched_users']}")
    base, patch = PromptStore.open(plan.sources[0], storage), PromptStore.open(plan.adapter, storage)
    head_state, head_config = patch.read_head()
    head = encode_head(head_state, head_config, patch.identity)
    write_file(fs, join(root, HEAD), head)
    manifest = Manifest(
        model=asdict(base.identity), prompt_length=base.manifest.prompt_length, hidden_size=base.identity.hidden_size,
        template=base.manifest.template, task=base.manifest.task, num_users=sum(r["rows"] for r in ordered),
        shards=[{"name": r["name"], "rows": r["rows"], "sha256": r["sha256"]} for r in ordered],
        lineage={**plan.lineage, "conversion": plan.identity, "rejects": {"users": 0, "by_reason": {}, "files": []}},
        provenance=plan.provenance, created_by=f"puma_ray {__version__}", head_sha256=sha256_hex(head))
    write_manifest(fs, root, manifest)
    return manifest


def patch_store(base_path: str, patch_path: str, target_path: str, storage: StorageOptions | None = None,
                overwrite: bool = False, provenance: dict | None = None, lineage: dict | None = None,
                log=print) -> dict:
    """The base store with the patch's users replaced → a complete new store at `target_path` (resumes an
    interrupted run of the same patch; refuses another unless `overwrite`). Returns a summary."""
    start = time.perf_counter()
    plan = plan_patch(base_path, patch_path, target_path, storage, provenance, lineage)
    check_output_location(plan)
    with OutputLock(target_path, "a new store version", storage):
        state = prepare_output(plan, ConvertConfig(overwrite=overwrite, progress=False), storage)
        if state is None:
            log(f"{target_path} is already this new version, complete: nothing to do")
            manifest = PromptStore.open(target_path, storage).manifest
            done = []
        else:
            done, todo = state
            if done:
                log(f"resuming: {len(done)} of {len(plan.units)} unit(s) already written, {len(todo)} to go")
            unit = PatchUnit(plan, storage)
            records = list(done) + [unit(u) for u in todo]
            manifest = finalize_patch(plan, records, storage)
    return {"store": target_path, "users": manifest.num_users, "patched": plan.lineage["patched_users"],
            "units": len(manifest.shards), "units_run": len(plan.units) - len(done) if state is not None else 0,
            "wall_s": round(time.perf_counter() - start, 3)}


def changed_users(old_path: str, new_path: str, storage: StorageOptions | None = None) -> pd.Series:
    """Per user of `old_path`: whether its prompt bytes differ in `new_path` (tests and the report's check)."""
    old_ids, old = PromptStore.open(old_path, storage).read_all()
    new_ids, new = PromptStore.open(new_path, storage).read_all()
    if not np.array_equal(old_ids, new_ids):
        raise StoreError(f"{new_path} holds other users than {old_path}")
    flat_old, flat_new = old.reshape(len(old), -1).view(np.uint32), new.reshape(len(new), -1).view(np.uint32)
    return pd.Series((flat_old != flat_new).any(axis=1), index=old_ids)
