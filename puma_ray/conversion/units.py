"""The conversion's units and output state (see convert.py for the whole run): what a unit writes, how a rerun
finds the finished ones, and the manifest written only when every user is accounted for.

Per unit: `shards/<name>` (the converted prompts), `rejects/<name>` (user_id, reason) when some users cannot be
converted, then `_progress/<name>.json` LAST (rows, checksums, timings): a unit without its record is redone.
`_conversion.json` names what the output is a conversion of; `finalize` writes head + manifest.json.
"""
from __future__ import annotations

import io
import json
import os
import resource
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load

from puma_ray import __version__
from puma_ray.artifacts.adapter_io import HEAD_FILE, adapter_config_name, load_adapter
from puma_ray.artifacts.formats import (
    CONVERSION_IDENTITY,
    CONVERSION_PROGRESS_DIR,
    CONVERSION_REJECTS_DIR,
    OUTPUT_LOCK,
    sha256_hex,
)
from puma_ray.artifacts.store import (
    HEAD,
    MANIFEST,
    SHARD_DIR,
    Manifest,
    PromptStore,
    StoreError,
    encode_head,
    encode_shard,
    finite_rows,
    out_of_scale_rows,
    scale_reason,
    write_manifest,
)
from puma_ray.conversion.plan import ConversionPlan, ConvertConfig
from puma_ray.fs import (
    StorageOptions,
    filesystem,
    is_temp_file,
    join,
    plain_name,
    read_json,
    redact,
    relation,
    write_file,
    write_json,
)
from puma_ray.models.adapter import PromptAdapter
from puma_ray.models.identity import ModelIdentity

IDENTITY_FILE, PROGRESS_DIR, REJECTS_DIR = CONVERSION_IDENTITY, CONVERSION_PROGRESS_DIR, CONVERSION_REJECTS_DIR


def read_bytes(fs, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


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


# ---------------------------------------------------------------------------------------------- the unit
def _rejects_table(user_ids: list, reasons: list) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"user_id": pa.array([str(u) for u in user_ids], pa.string()),
                             "reason": pa.array(reasons, pa.string())}), buf)
    return buf.getvalue()  # bytes: written atomically by write_file


class UnitConverter:
    """Loads the adapter and opens the stores once, then converts units; a Ray actor holds one of these."""

    def __init__(self, where: dict, storage: StorageOptions | None, batch_rows: int, threads: int = 1,
                 device: str | None = None):
        """where: the plan's {"adapter", "sources", "target", "max_prompt_scale"} (paths and the bound: cheap to
        ship to every actor)."""
        torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.adapter = load_adapter(where["adapter"], storage)[0].to(self.device)
        self.sources = [PromptStore.open(p, storage) for p in where["sources"]]
        self.fs, self.root = filesystem(where["target"], storage)
        self.batch_rows = batch_rows
        # each source's reference scale: the RMS the adapter normalises that source by (fixed at fit time)
        self.references = [float(s) for s in self.adapter.source_scales.cpu()]
        self.scale_bound = float(where.get("max_prompt_scale", 0.0))
        self.hooks = _FaultHooks.from_env()

    def _aligned(self, unit: dict) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """The first source's rows, the other sources' prompts of the same users, why a user cannot be converted
        ("" when it can)."""
        ids, first = self.sources[0].read_shard(unit["parts"][0][0], finite=False)
        reasons = np.where(finite_rows(first), "", f"non-finite prompt in source {self.sources[0].path}")
        reasons = self._scale_reasons(reasons, first, 0)
        prompts = [first]
        for i, (store, entries) in enumerate(zip(self.sources[1:], unit["parts"][1:]), start=1):
            read = [store.read_shard(e, finite=False) for e in entries]
            l, d = store.prompt_shape
            their_ids = np.concatenate([r[0] for r in read]) if read else np.array([], dtype=str)
            theirs = np.concatenate([r[1] for r in read]) if read else np.zeros((0, l, d), np.float32)
            pos = pd.Index(their_ids).get_indexer(ids)  # -1: the user is missing from this source
            aligned = np.zeros((len(ids), l, d), np.float32)
            aligned[pos >= 0] = theirs[pos[pos >= 0]]
            reasons = np.where((reasons == "") & (pos < 0), f"missing from source {store.path}", reasons)
            reasons = np.where((reasons == "") & ~finite_rows(aligned),
                               f"non-finite prompt in source {store.path}", reasons)
            reasons = self._scale_reasons(reasons, aligned, i)
            prompts.append(aligned)
        return ids, prompts, reasons.astype(object)  # object: a reason may be longer than the first one set

    def _scale_reasons(self, reasons: np.ndarray, prompts: np.ndarray, source: int) -> np.ndarray:
        """Marks users not yet rejected whose prompt is out of scale for the adapter (see PROMPT_SCALE_BOUND)."""
        bad = out_of_scale_rows(prompts, self.references[source], self.scale_bound)
        return np.where((reasons == "") & bad, scale_reason(self.sources[source].path, self.scale_bound), reasons)

    def __call__(self, unit: dict) -> dict:
        self.hooks.on_unit()
        started, name = time.time(), plain_name(unit["name"], "conversion unit", StoreError)
        ids, prompts, reasons = self._aligned(unit)
        ok = reasons == ""
        # indexing copies a whole shard: only when some row is left out (memory per actor ~ a few shards)
        out = map_prompts(self.adapter, prompts if ok.all() else [p[ok] for p in prompts], self.batch_rows,
                          self.device)
        del prompts
        good = finite_rows(out)
        reasons[np.flatnonzero(ok)[~good]] = "non-finite converted prompt"
        keep = np.flatnonzero(ok)[good]
        data, sha = encode_shard(ids[keep], out if good.all() else out[good])
        del out
        write_file(self.fs, join(self.root, SHARD_DIR, name), data)
        rejected = np.flatnonzero(reasons != "")
        record = {"name": name, "rows": int(len(keep)), "bytes": len(data), "sha256": sha,
                  "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "source_rows": int(len(ids)), "rejects": int(len(rejected)), "rejects_sha256": None,
                  "reasons": {str(r): int(c) for r, c in zip(*np.unique(reasons[rejected], return_counts=True))}}
        if len(rejected):
            rej = _rejects_table(ids[rejected].tolist(), reasons[rejected].tolist())
            write_file(self.fs, join(self.root, REJECTS_DIR, name), rej)
            record["rejects_sha256"] = sha256_hex(rej)
        if record["rows"] + record["rejects"] != record["source_rows"]:  # cannot happen; guards the invariant
            raise StoreError(f"unit {name}: {record['rows']} converted + {record['rejects']} rejected "
                             f"!= {record['source_rows']} source rows")
        record.update(started_at=started, finished_at=time.time())  # wall clock: units run in other processes
        # last, atomically: marks the unit done (a full disk leaves no record, so the unit is redone)
        write_json(self.fs, join(self.root, PROGRESS_DIR, name + ".json"), record, indent=None)
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
def check_output_location(plan: ConversionPlan) -> None:
    """The output may not be, contain or sit inside a source store or the adapter: a conversion that writes
    there would overwrite (or, with overwrite, delete) what it reads."""
    for kind, path in [*(("source store", s) for s in plan.sources), ("adapter", plan.adapter)]:
        how = relation(plan.target, path)
        if how:
            raise StoreError(f"output {plan.target} {how} the {kind} {path}: write the target store to a "
                             "folder of its own (a new or empty one)")


def _our_files(fs, root: str, plan: ConversionPlan, present: set[str]) -> set[str]:
    """Every file this output's own state names: the identity file, progress records and the shards and rejects
    they list, the shards/rejects/progress names the plan's units write, the manifest's shards, head, rejects.
    `present`: the folder's files, listed once by the caller."""
    ours = {join(root, IDENTITY_FILE), join(root, MANIFEST), join(root, HEAD),
            join(root, REJECTS_DIR, "_extra.parquet")}
    names = {u["name"] for u in plan.units}
    progress = join(root, PROGRESS_DIR) + "/"
    names |= {p[len(progress):-len(".json")] for p in present if p.startswith(progress) and p.endswith(".json")}
    manifest = _readable(fs, join(root, MANIFEST), f"output {plan.target}") if join(root, MANIFEST) in present \
        else None
    if isinstance(manifest, dict) and isinstance(manifest.get("shards"), list):
        names.update(e.get("name") for e in manifest["shards"] if isinstance(e, dict))
    for name in names:
        plain_name(name, f"output {plan.target}", StoreError)
        ours |= {join(root, SHARD_DIR, name), join(root, REJECTS_DIR, name), join(root, PROGRESS_DIR, name + ".json")}
    return ours


def _files_under(fs, root: str) -> set[str]:
    return {p.rstrip("/") for p in fs.find(root)} if fs.exists(root) else set()


def _readable(fs, path: str, where: str, log=print):
    """A JSON file of our own, or None when it is unreadable: a partial file an older (non-atomic) version left
    behind at a full disk or a kill is treated as absent and redone, with one line saying so."""
    try:
        return read_json(fs, path, where, StoreError)
    except StoreError:
        log(f"{where}: {path.rsplit('/', 1)[-1]} is unreadable (a partial write of an earlier run); treated as "
            "absent and redone")
        return None


def prepare_output(plan: ConversionPlan, cfg: ConvertConfig, storage=None) -> tuple[list[dict], list[dict]] | None:
    """(units done, units to do) — or None when the target is already this very conversion, complete.

    Refuses an output that is, holds or sits in a source or the adapter, and an existing folder that holds files
    this output's own state does not name (not ours: never deleted, never overwritten, whatever `overwrite`
    says). A folder of another conversion (or an interrupted one) is replaced only with `overwrite`, and then only
    the files its state names are removed."""
    check_output_location(plan)
    fs, root = filesystem(plan.target, storage)
    present = _files_under(fs, root)
    for leftover in sorted(p for p in present if is_temp_file(p)):
        fs.rm(leftover)  # a temporary file of our own atomic write, left by a kill or a full disk: ours to remove
    # the lock is the running writer's own (taken before this call), never part of the output's state
    present = {p for p in present if not is_temp_file(p) and p != join(root, OUTPUT_LOCK)}
    previous = None
    if present and join(root, IDENTITY_FILE) not in present:
        raise StoreError(f"output {plan.target} exists and holds files puma_ray did not write there (e.g. "
                         f"{sorted(present)[0]}); choose a new or empty folder")
    if present:
        previous = _readable(fs, join(root, IDENTITY_FILE), f"output {plan.target}")
        foreign = present - _our_files(fs, root, plan, present)
        if foreign:
            raise StoreError(f"output {plan.target} holds {sorted(foreign)[0]}, which its conversion state does not "
                             f"name ({len(foreign)} such file(s)); move it away or choose another folder")
    complete = join(root, MANIFEST) in present and _readable(fs, join(root, MANIFEST), f"output {plan.target}",
                                                              log=lambda _: None) is not None
    if previous is None and present:
        # the identity file is written before any unit: when it is unreadable no unit of this output can be
        # trusted to belong to this conversion; every file present is ours (checked above), so all are redone
        for path in sorted(present, key=lambda p: p != join(root, MANIFEST)):
            fs.rm(path)
        present = set()
    identity = redact(plan.identity)  # as written: the file holds no credential
    if not cfg.overwrite and present:
        if previous != identity:
            what = "a store" if complete else "an interrupted conversion of another adapter or other sources"
            raise StoreError(f"{plan.target} already holds {what}; pass overwrite to replace it")
        if complete:
            return None
    if present and (cfg.overwrite or previous != identity):
        # every file present is ours (checked above): the manifest first, so the old store reads as incomplete
        for path in sorted(present, key=lambda p: p != join(root, MANIFEST)):
            fs.rm(path)
    for sub in (SHARD_DIR, REJECTS_DIR, PROGRESS_DIR):
        fs.makedirs(join(root, sub), exist_ok=True)
    write_json(fs, join(root, IDENTITY_FILE), identity)
    if plan.extra_users:
        reason = f"missing from source {plan.sources[0]}"
        write_file(fs, join(root, REJECTS_DIR, "_extra.parquet"),
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
        if is_temp_file(entry):
            continue
        record = _readable(fs, entry, f"conversion progress {entry}")
        if isinstance(record, dict) and sizes.get(record.get("name")) == record.get("bytes"):
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
        data = read_bytes(fs, join(root, REJECTS_DIR, "_extra.parquet"))
        reject_files.append({"name": "_extra.parquet", "rows": len(plan.extra_users), "sha256": sha256_hex(data)})
        reject_paths.append(join(root, REJECTS_DIR, "_extra.parquet"))
        reason = f"missing from source {plan.sources[0]}"
        reasons[reason] = reasons.get(reason, 0) + len(plan.extra_users)
    converted = sum(r["rows"] for r in ordered)
    check_exactly_once(fs, [join(root, SHARD_DIR, r["name"]) for r in ordered], reject_paths, plan.total_users,
                       f"conversion into {plan.target}")
    adapter_fs, adapter_root = filesystem(plan.adapter, storage)
    config = json.loads(read_bytes(adapter_fs, join(adapter_root, adapter_config_name(adapter_fs, adapter_root,
                                                                                       plan.adapter))))
    head_state = st_load(read_bytes(adapter_fs, join(adapter_root, HEAD_FILE)))
    target = ModelIdentity.from_dict(config["target"])
    head = encode_head(head_state, config["head"], target)
    write_file(fs, join(root, HEAD), head)
    first = PromptStore.open(plan.sources[0], storage).manifest
    manifest = Manifest(
        model=asdict(target), prompt_length=first.prompt_length, hidden_size=target.hidden_size,
        template=first.template, task=config["task"], num_users=converted,
        shards=[{"name": r["name"], "rows": r["rows"], "sha256": r["sha256"]} for r in ordered],
        lineage={**plan.lineage, "conversion": plan.identity,
                 "rejects": {"users": plan.total_users - converted, "by_reason": reasons, "files": reject_files}},
        provenance=plan.provenance, created_by=f"puma_ray {__version__}", head_sha256=sha256_hex(head))
    write_manifest(fs, root, manifest)
    return manifest
