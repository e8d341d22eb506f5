"""Batch conversion: a fitted adapter applied to every user of the source store(s) → a complete target store.

The work is cut into units, one per shard of the first source; a unit's output shard takes that shard's name, so
a rerun overwrites and never duplicates. A unit reads its rows (aggregated: the same users' rows of the other
sources too), converts them, writes `shards/<name>`, then `rejects/<name>` when some users cannot be converted
(user, reason), then `_progress/<name>.json` LAST: a unit without its progress record is redone by a rerun, one
with it is skipped. `finalize` writes manifest.json only when every unit is done and converted + rejected users are
the source users, each exactly once. Units run in this process (`run_locally`) or on a Ray actor pool
(`ray_layer.convert`); the unit code (`UnitConverter`) is the same.

Output layout besides the store's own: `_conversion.json` (what this output is a conversion of: adapter and source
manifests by checksum, policy — a rerun of another conversion into it is refused), `_progress/`, `rejects/`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import load as safetensors_load

from puma_ray import __version__
from puma_ray.artifacts.adapter_io import HEAD_FILE, WEIGHTS_FILE, adapter_config_name, check_sources
from puma_ray.artifacts.formats import ADAPTER_FORMAT, check_format
from puma_ray.artifacts.lock import OutputLock
from puma_ray.artifacts.store import (
    MANIFEST,
    PROMPT_SCALE_BOUND,
    Manifest,
    PromptStore,
    StoreError,
    out_of_scale_rows,
    rms_per_user,
    typical_rms,
)
from puma_ray.conversion.plan import MISSING_POLICIES, ConversionPlan, ConvertConfig
from puma_ray.conversion.units import (
    UnitConverter,
    check_output_location,
    finalize,
    prepare_output,
    read_bytes,
    sha256_hex,
)
from puma_ray.errors import AdapterError
from puma_ray.fs import StorageOptions, filesystem, join


# ---------------------------------------------------------------------------------------------- in-memory helpers
@dataclass
class JoinedSources:
    users: np.ndarray  # sorted ids present in every source
    prompts: list[np.ndarray]  # per source, (n, l, d_s) aligned with users
    dropped: dict[str, int]  # source path -> users it lacked (policy "reject")
    # source path -> users whose prompt is out of scale there (left out of selection, fit and evaluation; the
    # conversion rejects them with the reason): one user's bad prompt never moves the others' statistics
    out_of_scale: dict[str, list[str]] = field(default_factory=dict)


def join_sources(stores: list[PromptStore], policy: str = "error",
                 scale_bound: float = PROMPT_SCALE_BOUND) -> JoinedSources:
    """Every source read into memory and aligned on user_id: what fitting needs (conversion streams instead).
    Users whose prompt RMS is beyond `scale_bound` x their store's median user RMS are left out (`out_of_scale`)."""
    if policy not in MISSING_POLICIES:
        raise ValueError(f"missing-user policy must be one of {MISSING_POLICIES}, got {policy!r}")
    _check_prompt_lengths(stores)
    tables = [s.read_all() for s in stores]
    all_users = np.unique(np.concatenate([ids for ids, _ in tables]))
    common, dropped = all_users, {}
    for store, (ids, _) in zip(stores, tables):
        missing = np.setdiff1d(all_users, ids)
        if len(missing):
            if policy == "error":
                raise StoreError(_missing_message(missing[0], store.path, len(missing)))
            dropped[store.path] = int(len(missing))
            common = np.intersect1d(common, ids)
    if len(common) == 0:
        raise StoreError("the source stores share no user: nothing to convert ("
                         + ", ".join(s.path for s in stores) + ")")
    aligned = [prompts[np.searchsorted(ids, common)] for ids, prompts in tables]
    keep, out_of_scale = np.ones(len(common), bool), {}
    for store, prompts in zip(stores, aligned):
        # the store's own median user RMS: a robust reference that no single user can move
        bad = out_of_scale_rows(prompts, typical_rms(rms_per_user(prompts)), scale_bound)
        if bad.any():
            out_of_scale[store.path] = common[bad].tolist()
            keep &= ~bad
    if not keep.all():
        common, aligned = common[keep], [p[keep] for p in aligned]
    return JoinedSources(common, aligned, dropped, out_of_scale)


def _missing_message(user, store_path: str, count: int) -> str:
    return (f"user {str(user)!r} is missing from source store {store_path} ({count} user(s) in all); "
            "set the missing-user policy to reject to convert the others and list these in the rejects table")


def _check_prompt_lengths(stores: list[PromptStore]) -> None:
    if len({s.manifest.prompt_length for s in stores}) > 1:
        raise StoreError("aggregated sources must share the prompt length l: "
                         + ", ".join(f"{s.path} l={s.manifest.prompt_length}" for s in stores))


# ---------------------------------------------------------------------------------------------- plan
def _adapter_identity(adapter_path: str, storage) -> tuple[dict, dict]:
    """(adapter config, checksums of its three files): a different fit never passes for this one."""
    fs, root = filesystem(adapter_path, storage)
    config_name = adapter_config_name(fs, root, adapter_path)  # an adapter from before the rename keeps its name
    raw = read_bytes(fs, join(root, config_name))
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterError(f"adapter {adapter_path}: {config_name} is not valid JSON") from None
    check_format(config.get("format") if isinstance(config, dict) else None, ADAPTER_FORMAT,
                 f"adapter {adapter_path} ({config_name})", AdapterError)
    sums = {}
    for name in (WEIGHTS_FILE, HEAD_FILE):
        data = read_bytes(fs, join(root, name))
        try:  # parsed here, in the driver: a garbage file is one line before any unit runs or anything is written
            safetensors_load(data)
        except Exception:
            raise AdapterError(f"adapter {adapter_path}: {name} is not a valid safetensors file") from None
        sums[name] = sha256_hex(data)
    return config, {config_name: sha256_hex(raw), **sums}


def plan_conversion(adapter_path: str, source_paths: list[str], target_path: str, cfg: ConvertConfig,
                    storage: StorageOptions | None = None, provenance: dict | None = None) -> ConversionPlan:
    """Checks everything that can be checked before writing (adapter ↔ source models, prompt shapes, missing
    users under policy "error") and cuts the work into units."""
    if not source_paths:
        raise StoreError("no source store given")
    config, adapter_sums = _adapter_identity(adapter_path, storage)
    stores = [PromptStore.open(p, storage) for p in source_paths]
    check_sources(config, [s.identity for s in stores])  # an adapter of other source models: refused here
    widths = [s.manifest.hidden_size for s in stores]
    if config.get("source_dims") != widths:
        raise AdapterError(f"adapter {adapter_path} maps prompts of width(s) {config.get('source_dims')}; the source "
                           f"store(s) hold width(s) {widths}")
    _check_prompt_lengths(stores)
    if config.get("prompt_length") not in (None, stores[0].manifest.prompt_length):
        raise AdapterError(f"adapter {adapter_path} maps l={config['prompt_length']} prompts, the source stores "
                           f"hold l={stores[0].manifest.prompt_length}")
    identity = {
        "format": "puma_ray.conversion/1", "adapter": adapter_path, "adapter_sha256": adapter_sums,
        "sources": [{"store": s.path, "manifest_sha256": sha256_hex(read_bytes(s.fs, join(s.root, MANIFEST)))}
                    for s in stores],
        "missing_policy": cfg.missing_policy,
        "max_prompt_scale": cfg.max_prompt_scale,  # part of what the output is: another bound, another output
        "puma_ray": __version__,  # another code version may convert differently: its progress is not resumed
    }
    lineage = {"kind": "migrated", "adapter": adapter_path,
               "sources": [{"store": s.path, "model": s.manifest.model, "lineage": s.manifest.lineage}
                           for s in stores]}
    first = stores[0].manifest.shards
    if len(stores) == 1:
        units = [{"name": e["name"], "parts": [[e]]} for e in first]
        return ConversionPlan(adapter_path, list(source_paths), target_path, identity, units,
                              stores[0].manifest.num_users, [], lineage, provenance or {})
    return _plan_aggregated(stores, cfg, identity, lineage, adapter_path, target_path, provenance or {})


def _plan_aggregated(stores, cfg, identity, lineage, adapter_path, target_path, provenance) -> ConversionPlan:
    """Indexes every source's user ids (the id column only) to give each unit just the shards it needs."""
    index = []  # per source: (ids, shard position), ids sorted
    for s in stores:
        parts = [s.read_user_ids(e) for e in s.manifest.shards]
        ids = np.concatenate(parts) if parts else np.array([], dtype=str)
        where = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
        order = np.argsort(ids, kind="stable")
        index.append((ids[order], where[order], parts))
    union = np.unique(np.concatenate([ids for ids, _, _ in index]))
    for s, (ids, _, _) in zip(stores, index):
        missing = np.setdiff1d(union, ids)
        if len(missing) and cfg.missing_policy == "error":
            raise StoreError(_missing_message(missing[0], s.path, len(missing)))
    units = []
    for i, entry in enumerate(stores[0].manifest.shards):
        users = index[0][2][i]
        parts = [[entry]]
        for s, (ids, where, _) in zip(stores[1:], index[1:]):
            pos = np.clip(np.searchsorted(ids, users), 0, max(len(ids) - 1, 0))
            found = len(ids) > 0
            needed = np.unique(where[pos[ids[pos] == users]]).tolist() if found else []
            parts.append([s.manifest.shards[j] for j in needed])
        units.append({"name": entry["name"], "parts": parts})
    extra = np.setdiff1d(union, index[0][0])  # in some other source, absent from the first: rejected up front
    return ConversionPlan(adapter_path, [s.path for s in stores], target_path, identity, units, len(union),
                          extra.tolist(), lineage, provenance)


# ---------------------------------------------------------------------------------------------- the whole run
Runner = Callable[[ConversionPlan, list[dict], ConvertConfig, StorageOptions | None], Iterable[dict]]


def run_locally(plan: ConversionPlan, units: list[dict], cfg: ConvertConfig, storage=None) -> Iterator[dict]:
    converter = UnitConverter(plan.where(), storage, cfg.batch_rows, cfg.threads_per_actor,
                              "cuda" if cfg.gpus_per_actor and torch.cuda.is_available() else "cpu")
    for unit in units:
        yield converter(unit)


def convert(adapter_path: str, source_paths: list[str], target_path: str, cfg: ConvertConfig | None = None,
            storage: StorageOptions | None = None, runner: Runner = run_locally, provenance: dict | None = None,
            log=print) -> dict:
    """Plans, resumes what an interrupted run left, converts the rest, writes the manifest. Returns the summary."""
    cfg = cfg or ConvertConfig()
    start = time.perf_counter()
    plan = plan_conversion(adapter_path, source_paths, target_path, cfg, storage, provenance)
    check_output_location(plan)  # before the lock creates anything: an output inside a source is refused clean
    with OutputLock(target_path, "a conversion", storage):  # one writer: a second run is refused, one line
        return _convert_locked(plan, cfg, storage, runner, log, start)


def _convert_locked(plan: ConversionPlan, cfg: ConvertConfig, storage, runner: Runner, log, start: float) -> dict:
    target_path = plan.target
    state = prepare_output(plan, cfg, storage)
    if state is None:
        manifest = PromptStore.open(target_path, storage).manifest
        log(f"{target_path} is already this conversion, complete: nothing to do")
        return _summary(target_path, manifest, 0, 0, time.perf_counter() - start)
    done, todo = state
    if done:
        log(f"resuming: {len(done)} of {len(plan.units)} unit(s) already converted, {len(todo)} to go")
    bar = _progress_bar(plan.total_users, sum(r["source_rows"] for r in done), cfg.progress)
    records = list(done)
    for record in runner(plan, todo, cfg, storage):
        records.append(record)
        bar.update(record["source_rows"])
    bar.close()
    manifest = finalize(plan, records, storage)
    converted_now = sum(r["source_rows"] for r in records[len(done):])
    return _summary(target_path, manifest, len(todo), converted_now, time.perf_counter() - start)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="rows", unit_scale=True, desc="convert", disable=not enabled,
                smoothing=0.1, dynamic_ncols=True)


def _summary(target: str, manifest: Manifest, units_run: int, rows_run: int, wall: float) -> dict:
    rejects = manifest.lineage.get("rejects", {})
    return {"store": target, "users": manifest.num_users, "rejected": rejects.get("users", 0),
            "rejected_by_reason": rejects.get("by_reason", {}), "units": len(manifest.shards),
            "units_run": units_run, "wall_s": round(wall, 3),
            "rows_per_s": round(rows_run / wall, 1) if wall > 0 and rows_run else None}
