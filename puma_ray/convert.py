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

import hashlib
import io
import json
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load

from . import __version__
from .adapter import CONFIG_FILE, HEAD_FILE, WEIGHTS_FILE, AdapterError, PromptAdapter, check_sources, load_adapter
from .config import ConfigError
from .fs import StorageOptions, filesystem, join
from .store import (HEAD, MANIFEST, SHARD_DIR, Manifest, ModelIdentity, PromptStore, StoreError, encode_head,
                    encode_shard, finite_rows, write_manifest)

MISSING_POLICIES = ("error", "reject")
IDENTITY_FILE, PROGRESS_DIR, REJECTS_DIR = "_conversion.json", "_progress", "rejects"


@dataclass
class ConvertConfig:
    actors: int = 2  # Ray actor pool size; one per GPU on a GPU cluster
    cpus_per_actor: float = 0.5  # fractional: actors holding every CPU starve Ray Data's own tasks (a silent hang)
    gpus_per_actor: float = 0.0  # 1 on a GPU cluster: the adapter then runs there
    threads_per_actor: int = 1  # torch threads per actor: actors x threads <= cores, or they thrash
    batch_rows: int = 8192  # rows per adapter forward: bounds activations (8192 x 4096 hidden x 4 B = 128 MB)
    missing_policy: str = "error"  # aggregated: a user absent from one source is an "error", or a counted "reject"
    overwrite: bool = False  # replace a finished store, or an interrupted conversion of another adapter/sources
    progress: bool = True  # the rows/s bar on stderr
    # jobs/migrate.py's last stage: "engine" = the actor pool when the engine is Ray; "local" = this process
    # (a demo's thousand users convert in well under a second, less than an actor pool takes to start)
    runs_on: str = "engine"

    def __post_init__(self):
        if self.actors < 1:
            raise ConfigError(f"convert.actors must be >= 1, got {self.actors}")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ConfigError("convert.cpus_per_actor must be > 0 and convert.gpus_per_actor >= 0")
        if self.threads_per_actor < 1 or self.batch_rows < 1:
            raise ConfigError("convert.threads_per_actor and convert.batch_rows must be >= 1")
        if self.runs_on not in ("engine", "local"):
            raise ConfigError(f"convert.runs_on must be 'engine' or 'local', got {self.runs_on!r}")
        if self.missing_policy not in MISSING_POLICIES:
            raise ConfigError(f"convert.missing_policy must be one of {MISSING_POLICIES}, got {self.missing_policy!r}")


# ---------------------------------------------------------------------------------------------- in-memory helpers
@dataclass
class JoinedSources:
    users: np.ndarray  # sorted ids present in every source
    prompts: list[np.ndarray]  # per source, (n, l, d_s) aligned with users
    dropped: dict[str, int]  # source path -> users it lacked (policy "reject")


def join_sources(stores: list[PromptStore], policy: str = "error") -> JoinedSources:
    """Every source read into memory and aligned on user_id: what fitting needs (conversion streams instead)."""
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
    return JoinedSources(common, aligned, dropped)


def _missing_message(user, store_path: str, count: int) -> str:
    return (f"user {str(user)!r} is missing from source store {store_path} ({count} user(s) in all); "
            "set the missing-user policy to reject to convert the others and list these in the rejects table")


def _check_prompt_lengths(stores: list[PromptStore]) -> None:
    if len({s.manifest.prompt_length for s in stores}) > 1:
        raise StoreError("aggregated sources must share the prompt length l: "
                         + ", ".join(f"{s.path} l={s.manifest.prompt_length}" for s in stores))


@torch.no_grad()
def map_prompts(adapter: PromptAdapter, sources: list[np.ndarray], batch_size: int = 8192,
                device: str = "cpu") -> np.ndarray:
    """(n, l, d_t) float32, filled batch by batch into one array (no list of parts to concatenate: half the
    peak memory at a shard of 65k x 640)."""
    adapter.eval()
    n, l = sources[0].shape[:2]
    out = np.empty((n, l, adapter.target_dim), np.float32)
    for i in range(0, n, batch_size):
        batch = [torch.from_numpy(np.require(s[i:i + batch_size], requirements="W")).to(device) for s in sources]
        out[i:i + batch_size] = adapter(*batch).float().cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class ConversionPlan:
    adapter: str
    sources: list[str]
    target: str
    identity: dict  # what the output is a conversion of (checked on every rerun)
    units: list[dict]  # {"name", "parts": per source, the shard entries holding the unit's users}
    total_users: int  # every source user, once (the union over sources)
    extra_users: list = field(default_factory=list)  # absent from the first source: rejects/_extra.parquet
    lineage: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def where(self) -> dict:
        return {"adapter": self.adapter, "sources": self.sources, "target": self.target}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_bytes(fs, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def _write_bytes(fs, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as f:
        f.write(data)


def _adapter_identity(adapter_path: str, storage) -> tuple[dict, dict]:
    """(adapter config, checksums of its three files): a different fit never passes for this one."""
    fs, root = filesystem(adapter_path, storage)
    if not fs.exists(join(root, CONFIG_FILE)):
        raise AdapterError(f"adapter {adapter_path} has no {CONFIG_FILE} (incomplete or not an adapter)")
    raw = _read_bytes(fs, join(root, CONFIG_FILE))
    sums = {name: _sha256(_read_bytes(fs, join(root, name))) for name in (WEIGHTS_FILE, HEAD_FILE)}
    return json.loads(raw), {CONFIG_FILE: _sha256(raw), **sums}


def plan_conversion(adapter_path: str, source_paths: list[str], target_path: str, cfg: ConvertConfig,
                    storage: StorageOptions | None = None, provenance: dict | None = None) -> ConversionPlan:
    """Checks everything that can be checked before writing (adapter ↔ source models, prompt shapes, missing
    users under policy "error") and cuts the work into units."""
    if not source_paths:
        raise StoreError("no source store given")
    config, adapter_sums = _adapter_identity(adapter_path, storage)
    stores = [PromptStore.open(p, storage) for p in source_paths]
    check_sources(config, [s.identity for s in stores])  # an adapter of other source models: refused here
    _check_prompt_lengths(stores)
    if config.get("prompt_length") not in (None, stores[0].manifest.prompt_length):
        raise AdapterError(f"adapter {adapter_path} maps l={config['prompt_length']} prompts, the source stores "
                           f"hold l={stores[0].manifest.prompt_length}")
    identity = {
        "format": "puma_ray.conversion/1", "adapter": adapter_path, "adapter_sha256": adapter_sums,
        "sources": [{"store": s.path, "manifest_sha256": _sha256(_read_bytes(s.fs, join(s.root, MANIFEST)))}
                    for s in stores],
        "missing_policy": cfg.missing_policy,
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
            needed = sorted(set(where[pos[ids[pos] == users]].tolist())) if found else []
            parts.append([s.manifest.shards[j] for j in needed])
        units.append({"name": entry["name"], "parts": parts})
    extra = np.setdiff1d(union, index[0][0])  # in some other source, absent from the first: rejected up front
    return ConversionPlan(adapter_path, [s.path for s in stores], target_path, identity, units, len(union),
                          extra.tolist(), lineage, provenance)


# ---------------------------------------------------------------------------------------------- the unit
def _rejects_table(user_ids: list, reasons: list) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"user_id": pa.array([str(u) for u in user_ids], pa.string()),
                             "reason": pa.array(reasons, pa.string())}), buf)
    return buf.getvalue()


class UnitConverter:
    """Loads the adapter and opens the stores once, then converts units; a Ray actor holds one of these."""

    def __init__(self, where: dict, storage: StorageOptions | None, batch_rows: int, threads: int = 1,
                 device: str | None = None):
        """where: the plan's {"adapter", "sources", "target"} (paths only: cheap to ship to every actor)."""
        torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.adapter = load_adapter(where["adapter"], storage)[0].to(self.device)
        self.sources = [PromptStore.open(p, storage) for p in where["sources"]]
        self.fs, self.root = filesystem(where["target"], storage)
        self.batch_rows = batch_rows
        self.hooks = _FaultHooks.from_env()

    def _aligned(self, unit: dict) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
        """The first source's rows, the other sources' prompts of the same users, why a user cannot be converted
        ("" when it can)."""
        ids, first = self.sources[0].read_shard(unit["parts"][0][0], finite=False)
        reasons = np.where(finite_rows(first), "", f"non-finite prompt in source {self.sources[0].path}")
        prompts = [first]
        for store, entries in zip(self.sources[1:], unit["parts"][1:]):
            read = [store.read_shard(e, finite=False) for e in entries]
            l, d = store.prompt_shape
            their_ids = np.concatenate([r[0] for r in read]) if read else np.array([], dtype=str)
            theirs = np.concatenate([r[1] for r in read]) if read else np.zeros((0, l, d), np.float32)
            lookup = {u: i for i, u in enumerate(their_ids.tolist())}
            pos = np.array([lookup.get(u, -1) for u in ids.tolist()], dtype=np.int64)
            aligned = np.zeros((len(ids), l, d), np.float32)
            aligned[pos >= 0] = theirs[pos[pos >= 0]]
            reasons = np.where((reasons == "") & (pos < 0), f"missing from source {store.path}", reasons)
            reasons = np.where((reasons == "") & ~finite_rows(aligned),
                               f"non-finite prompt in source {store.path}", reasons)
            prompts.append(aligned)
        return ids, prompts, reasons.tolist()

    def __call__(self, unit: dict) -> dict:
        self.hooks.on_unit()
        started, name = time.time(), unit["name"]
        ids, prompts, reasons = self._aligned(unit)
        ok = np.array([r == "" for r in reasons], dtype=bool)
        # indexing copies a whole shard: only when some row is left out (memory per actor ~ a few shards)
        out = map_prompts(self.adapter, prompts if ok.all() else [p[ok] for p in prompts], self.batch_rows,
                          self.device)
        del prompts
        good = finite_rows(out)
        reasons = np.asarray(reasons, dtype=object)
        reasons[np.flatnonzero(ok)[~good]] = "non-finite converted prompt"
        keep = np.flatnonzero(ok)[good]
        data, sha = encode_shard(ids[keep], out if good.all() else out[good])
        del out
        _write_bytes(self.fs, join(self.root, SHARD_DIR, name), data)
        rejected = np.flatnonzero(reasons != "")
        record = {"name": name, "rows": int(len(keep)), "bytes": len(data), "sha256": sha,
                  "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "source_rows": int(len(ids)), "rejects": int(len(rejected)), "rejects_sha256": None,
                  "reasons": {str(r): int(c) for r, c in zip(*np.unique(reasons[rejected], return_counts=True))}}
        if len(rejected):
            rej = _rejects_table(ids[rejected].tolist(), reasons[rejected].tolist())
            _write_bytes(self.fs, join(self.root, REJECTS_DIR, name), rej)
            record["rejects_sha256"] = _sha256(rej)
        if record["rows"] + record["rejects"] != record["source_rows"]:  # cannot happen; guards the invariant
            raise StoreError(f"unit {name}: {record['rows']} converted + {record['rejects']} rejected "
                             f"!= {record['source_rows']} source rows")
        record.update(started_at=started, finished_at=time.time())  # wall clock: units run in other processes
        with self.fs.open(join(self.root, PROGRESS_DIR, name + ".json"), "w") as f:  # last: marks the unit done
            json.dump(record, f)
        return record


@dataclass
class _FaultHooks:
    """Fault injection for the kill tests only (environment, so a local Ray's actors inherit it): a pid file per
    unit started, and a pause per unit so that a test can kill something mid-run."""
    pid_dir: str | None = None
    delay_s: float = 0.0

    @classmethod
    def from_env(cls) -> "_FaultHooks":
        return cls(os.environ.get("PUMA_CONVERT_PID_DIR"), float(os.environ.get("PUMA_CONVERT_UNIT_DELAY_S", 0)))

    def on_unit(self) -> None:
        if self.pid_dir:
            with open(os.path.join(self.pid_dir, f"{os.getpid()}.pid"), "w") as f:
                f.write(str(os.getpid()))
        if self.delay_s:
            time.sleep(self.delay_s)


# ---------------------------------------------------------------------------------------------- output state
def _clear(fs, root: str) -> None:
    if fs.exists(join(root, MANIFEST)):
        fs.rm(join(root, MANIFEST))  # first: from here on the old store reads as incomplete
    for sub in (SHARD_DIR, REJECTS_DIR, PROGRESS_DIR, HEAD, IDENTITY_FILE):
        if fs.exists(join(root, sub)):
            fs.rm(join(root, sub), recursive=True)


def prepare_output(plan: ConversionPlan, cfg: ConvertConfig, storage=None) -> tuple[list[dict], list[dict]] | None:
    """(units done, units to do) — or None when the target is already this very conversion, complete.
    Refuses a target holding another store or another conversion unless `overwrite`."""
    fs, root = filesystem(plan.target, storage)
    previous = None
    if fs.exists(join(root, IDENTITY_FILE)):
        with fs.open(join(root, IDENTITY_FILE), "r") as f:
            previous = json.load(f)
    complete = fs.exists(join(root, MANIFEST))
    if not cfg.overwrite and (complete or fs.exists(join(root, SHARD_DIR))):
        if previous != plan.identity:
            what = "a store" if complete else "an interrupted conversion of another adapter or other sources"
            raise StoreError(f"{plan.target} already holds {what}; pass overwrite to replace it")
        if complete:
            return None
    if cfg.overwrite or previous != plan.identity:
        _clear(fs, root)
    for sub in (SHARD_DIR, REJECTS_DIR, PROGRESS_DIR):
        fs.makedirs(join(root, sub), exist_ok=True)
    with fs.open(join(root, IDENTITY_FILE), "w") as f:
        json.dump(plan.identity, f, indent=1)
    if plan.extra_users:
        reason = f"missing from source {plan.sources[0]}"
        _write_bytes(fs, join(root, REJECTS_DIR, "_extra.parquet"),
                     _rejects_table(plan.extra_users, [reason] * len(plan.extra_users)))
    done, todo = [], []
    finished = _finished_units(fs, root)
    for unit in plan.units:
        record = finished.get(unit["name"])
        (done if record is not None else todo).append(record if record is not None else unit)
    return done, todo


def _listing(fs, path: str, detail: bool) -> list:
    try:  # an object store has no empty folders: nothing written yet lists as missing
        return fs.ls(path, detail=detail, refresh=True)
    except FileNotFoundError:
        return []


def _finished_units(fs, root: str) -> dict[str, dict]:
    """Units whose progress record exists and whose shard has the recorded size; two listings, not a request per
    unit (thousands of units on S3)."""
    sizes = {os.path.basename(e["name"]): e["size"] for e in _listing(fs, join(root, SHARD_DIR), True)}
    finished = {}
    for entry in _listing(fs, join(root, PROGRESS_DIR), False):
        with fs.open(entry, "r") as f:
            record = json.load(f)
        if sizes.get(record["name"]) == record["bytes"]:
            finished[record["name"]] = record
    return finished


# ---------------------------------------------------------------------------------------------- finalize
def _column(fs, paths: list[str]) -> pa.ChunkedArray:
    chunks = []
    for p in paths:
        with fs.open(p, "rb") as f:
            chunks.extend(pq.read_table(f, columns=["user_id"]).column("user_id").chunks)
    return pa.chunked_array(chunks, type=pa.string())


def check_exactly_once(fs, shard_paths: list[str], reject_paths: list[str], expected: int, where: str) -> None:
    """Converted and rejected user ids (only their column is read): no user twice, `expected` users in all."""
    import pyarrow.compute as pc
    ids = _column(fs, shard_paths + reject_paths)
    counts = pc.value_counts(ids)
    twice = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(twice):
        raise StoreError(f"{where}: user {twice[0].as_py()!r} appears more than once among converted and "
                         f"rejected users ({len(twice)} user(s) in all)")
    if len(ids) != expected:
        raise StoreError(f"{where}: {len(ids)} users converted or rejected, the sources hold {expected}")


def finalize(plan: ConversionPlan, records: list[dict], storage=None) -> Manifest:
    fs, root = filesystem(plan.target, storage)
    by_name = {r["name"]: r for r in records}
    missing = [u["name"] for u in plan.units if u["name"] not in by_name]
    if missing:
        raise StoreError(f"{plan.target}: unit {missing[0]} has no result ({len(missing)} in all); no manifest")
    ordered = [by_name[u["name"]] for u in plan.units]
    reject_files = [{"name": r["name"], "rows": r["rejects"], "sha256": r["rejects_sha256"]}
                    for r in ordered if r["rejects"]]
    reject_paths = [join(root, REJECTS_DIR, f["name"]) for f in reject_files]
    reasons: dict[str, int] = {}
    for r in ordered:
        for reason, n in r["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    if plan.extra_users:
        data = _read_bytes(fs, join(root, REJECTS_DIR, "_extra.parquet"))
        reject_files.append({"name": "_extra.parquet", "rows": len(plan.extra_users), "sha256": _sha256(data)})
        reject_paths.append(join(root, REJECTS_DIR, "_extra.parquet"))
        reason = f"missing from source {plan.sources[0]}"
        reasons[reason] = reasons.get(reason, 0) + len(plan.extra_users)
    converted = sum(r["rows"] for r in ordered)
    check_exactly_once(fs, [join(root, SHARD_DIR, r["name"]) for r in ordered], reject_paths, plan.total_users,
                       f"conversion into {plan.target}")
    adapter_fs, adapter_root = filesystem(plan.adapter, storage)
    config = json.loads(_read_bytes(adapter_fs, join(adapter_root, CONFIG_FILE)))
    head_state = st_load(_read_bytes(adapter_fs, join(adapter_root, HEAD_FILE)))
    target = ModelIdentity.from_dict(config["target"])
    _write_bytes(fs, join(root, HEAD), encode_head(head_state, config["head"], target))
    first = PromptStore.open(plan.sources[0], storage).manifest
    manifest = Manifest(
        model=asdict(target), prompt_length=first.prompt_length, hidden_size=target.hidden_size,
        template=first.template, task=config["task"], num_users=converted,
        shards=[{"name": r["name"], "rows": r["rows"], "sha256": r["sha256"]} for r in ordered],
        lineage={**plan.lineage, "conversion": plan.identity,
                 "rejects": {"users": plan.total_users - converted, "by_reason": reasons, "files": reject_files}},
        provenance=plan.provenance, created_by=f"puma_ray {__version__}")
    write_manifest(fs, root, manifest)
    return manifest


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
