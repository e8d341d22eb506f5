"""The personalization store: every user's soft prompt for ONE model, plus that model's task head.

Layout (local folder or s3:// prefix):
    shards/part-00000.parquet ...  user_id: string, prompt: fixed_size_list<float32>[l*d]  (bounded rows each)
    head.safetensors               the task head, its config in the safetensors metadata
    manifest.json                  written LAST: format, model identity + weight fingerprint, l, d, template, task,
                                   user count, every shard's rows + sha256, lineage, provenance

A store without manifest.json is incomplete (a write was interrupted) and is refused. A store is bound to its
model: `check_model` refuses any model whose fingerprint differs, naming both.
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from puma_ray import __version__
from puma_ray.artifacts.formats import STORE_FORMAT_VERSION, STORE_HEAD, STORE_MANIFEST, STORE_SHARD_DIR, sha256_hex
from puma_ray.errors import StoreError
from puma_ray.fs import StorageOptions, child, filesystem, join, plain_name, read_json, write_file, write_json
from puma_ray.ids import check_id_column, check_ids
from puma_ray.models.identity import ModelIdentity

FORMAT_VERSION, MANIFEST, HEAD, SHARD_DIR = STORE_FORMAT_VERSION, STORE_MANIFEST, STORE_HEAD, STORE_SHARD_DIR


@dataclass
class Manifest:
    model: dict
    prompt_length: int
    hidden_size: int
    template: dict
    task: str
    num_users: int
    shards: list[dict]  # {"name", "rows", "sha256"}
    lineage: dict = field(default_factory=dict)  # {"kind": "trained"|"migrated", "sources": [...], "adapter": ...}
    provenance: dict = field(default_factory=dict)  # data, config, metrics that made it
    head_sha256: str | None = None  # the head file's checksum (None: a store written before heads were checksummed)
    format_version: int = FORMAT_VERSION
    created_by: str = f"puma_ray {__version__}"
    created_at: str = ""

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity.from_dict(self.model)


def check_manifest_names(manifest: Manifest, where: str) -> None:
    """Every file name a manifest lists (shards, rejects) is a plain, unique name: the store's files stay inside
    its folder whatever the manifest says (it is input: a shared store may have been tampered with)."""
    if not isinstance(manifest.shards, list) or not all(isinstance(e, dict) for e in manifest.shards):
        raise StoreError(f"{where}: shards must be a list of entries")
    for key, entries in (("shards", manifest.shards),
                         ("lineage.rejects.files", (manifest.lineage.get("rejects") or {}).get("files", []))):
        names = [plain_name(e.get("name"), f"{where} {key}", StoreError) for e in entries]
        if len(set(names)) != len(names):
            raise StoreError(f"{where}: {key} lists a file twice")


def prompts_table(user_ids, prompts: np.ndarray) -> pa.Table:
    """(n,) ids + (n, l, d) float32 → the shard schema; the fixed-size list keeps l*d checkable on read."""
    flat = np.ascontiguousarray(prompts, dtype=np.float32).reshape(len(prompts), -1)
    values = pa.array(flat.reshape(-1), type=pa.float32())
    return pa.table({
        "user_id": pa.array(np.asarray(user_ids).astype(str), type=pa.string()),
        "prompt": pa.FixedSizeListArray.from_arrays(values, flat.shape[1]),
    })


def _id_array(column) -> np.ndarray:
    """User ids as a numpy unicode array, never an object array: numpy's set operations (unique, setdiff1d, isin)
    on object arrays compare every id with every other (O(n^2): 26 min at 100k users, measured)."""
    return column.to_numpy(zero_copy_only=False).astype(str) if len(column) else np.array([], dtype=str)


def encode_shard(user_ids, prompts: np.ndarray) -> tuple[memoryview, str]:
    """The parquet bytes of one shard and their sha256 (what the manifest records)."""
    sink = pa.BufferOutputStream()  # its buffer is handed over without the copy BytesIO.getvalue() makes
    pq.write_table(prompts_table(user_ids, prompts), sink)
    data = memoryview(sink.getvalue())
    return data, sha256_hex(data)


def encode_head(state_dict: dict[str, torch.Tensor], head_config: dict, model: ModelIdentity) -> bytes:
    # keys in sorted order: the same head gives the same bytes (and checksum) whichever way its dict was built
    # (a state_dict, or a safetensors file read back, whose order differs)
    tensors = {k: state_dict[k].detach().cpu().contiguous() for k in sorted(state_dict)}
    return st_save(tensors, metadata={"head_config": json.dumps(head_config), "model": model.fingerprint})


def write_manifest(fs, root: str, manifest: Manifest) -> None:
    """The last write of every store: before it exists, readers refuse the store as incomplete."""
    manifest.created_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json(fs, join(root, MANIFEST), asdict(manifest))  # atomic: a full disk never leaves half a manifest


def finite_rows(prompts: np.ndarray) -> np.ndarray:
    return np.isfinite(prompts.reshape(len(prompts), -1)).all(axis=1)


# A prompt whose RMS is this many times off its reference scale (either way) is rejected as out of scale. Why
# 100: a store's Eq. 1 prompts sit within a few x of each other (they start at the embedding scale and move
# little), while a prompt scaled by a bug upstream (x1e6, x1e30) would otherwise be converted without a word
# and, before the adapter's scale was a robust statistic, shrank every other user's input to ~0.
PROMPT_SCALE_BOUND = 100.0


def rms_per_user(prompts: np.ndarray) -> np.ndarray:
    """(n,) root mean square of each user's (l, d) prompt, in float64 (a 1e30 prompt squared stays finite)."""
    flat = prompts.reshape(len(prompts), -1).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.sqrt(np.mean(flat * flat, axis=1)) if flat.shape[1] else np.zeros(len(prompts))


def typical_rms(rms: np.ndarray) -> float:
    """The median of per-user prompt RMS values (finite ones; 0.0 when none): a store's scale that no single user
    moves, where the RMS of all prompts together is one 1e6 prompt's (and shrank every other input)."""
    rms = np.asarray(rms, dtype=np.float64)
    rms = rms[np.isfinite(rms)]
    return float(np.median(rms)) if len(rms) else 0.0


def prompt_scale(prompts: np.ndarray) -> float:
    """The adapter's source scale for these (n, l, d) prompts: their typical per-user RMS (1.0 for all-zero
    prompts: dividing by it must stay defined)."""
    return typical_rms(rms_per_user(prompts)) or 1.0


def out_of_scale_rows(prompts: np.ndarray, reference: float, bound: float = PROMPT_SCALE_BOUND) -> np.ndarray:
    """(n,) True where a user's prompt RMS is more than `bound` x above or below `reference` (a non-finite
    prompt is not flagged here: finite_rows names that reason). `bound` <= 0 turns the check off."""
    if bound <= 0 or not np.isfinite(reference) or reference <= 0:
        return np.zeros(len(prompts), bool)
    rms = rms_per_user(prompts)
    with np.errstate(invalid="ignore"):
        return np.isfinite(rms) & ((rms > reference * bound) | (rms < reference / bound))


def scale_reason(source: str, bound: float) -> str:
    """The rejects table's reason for an out-of-scale prompt: one string per source (reasons are counted)."""
    return f"prompt out of scale in source {source} (RMS beyond {bound:g}x the reference scale)"


def check_finite(user_ids, prompts: np.ndarray, where: str) -> None:
    bad = ~finite_rows(prompts)
    if bad.any():
        raise StoreError(f"{where}: non-finite prompt for user {str(np.asarray(user_ids)[bad][0])!r} "
                         f"({int(bad.sum())} user(s) in all)")


def _readable_manifest(fs, path: str) -> bool:
    try:
        return isinstance(read_json(fs, path, path, StoreError), dict)
    except StoreError:
        return False


class StoreWriter:
    """Writes shards, then the head, then (on `close`) the manifest; refuses duplicates and non-finite prompts."""

    def __init__(self, path: str, model: ModelIdentity, prompt_length: int, template: dict, task: str,
                 shard_rows: int = 65_536, storage: StorageOptions | None = None, overwrite: bool = False,
                 lineage: dict | None = None, provenance: dict | None = None):
        if shard_rows < 1:
            raise StoreError(f"shard_rows must be >= 1, got {shard_rows}")
        self.path, self.model, self.l, self.template, self.task = path, model, prompt_length, template, task
        self.shard_rows, self.lineage, self.provenance = shard_rows, lineage or {}, provenance or {}
        self.fs, self.root = filesystem(path, storage)
        if self.fs.exists(join(self.root, MANIFEST)) and not _readable_manifest(self.fs, join(self.root, MANIFEST)):
            # a partial manifest an older (non-atomic) version left at a full disk: the store was never complete
            print(f"store {path}: {MANIFEST} is unreadable (a partial write of an earlier run); treated as absent "
                  "and the store written anew")
            self.fs.rm(join(self.root, MANIFEST))
        if self.fs.exists(join(self.root, MANIFEST)):
            if not overwrite:
                raise StoreError(f"store {path} already exists (has {MANIFEST}); pass overwrite to replace it")
            # manifest first: from here on the old store reads as incomplete, never as a mix of old and new
            self.fs.rm(join(self.root, MANIFEST))
        if self.fs.exists(join(self.root, SHARD_DIR)):
            self.fs.rm(join(self.root, SHARD_DIR), recursive=True)
        self.fs.makedirs(join(self.root, SHARD_DIR), exist_ok=True)
        self.shards: list[dict] = []
        # every written shard's ids, checked for a user written twice within a shard at once and across shards at
        # close (one sort): numpy arrays, not a Python set (~100 B a user: 1 GB in a driver listing 10M users)
        self._ids: list[np.ndarray] = []
        self._head_written = False

    def write(self, user_ids, prompts: np.ndarray) -> None:
        """Writes (n, l, d) prompts as as many bounded shards as needed."""
        prompts = np.asarray(prompts, dtype=np.float32)
        if prompts.ndim != 3 or prompts.shape[1:] != (self.l, self.model.hidden_size):
            raise StoreError(f"store {self.path}: prompts of shape {prompts.shape[1:]} do not match "
                             f"(l={self.l}, d={self.model.hidden_size}) of {self.model.describe()}")
        check_ids(user_ids, "user id", f"store {self.path}", StoreError)  # before numpy drops a trailing NUL
        user_ids = np.asarray(user_ids).astype(str)
        for start in range(0, len(user_ids), self.shard_rows):
            stop = start + self.shard_rows
            self.write_shard(user_ids[start:stop], prompts[start:stop])

    def write_shard(self, user_ids, prompts: np.ndarray, name: str | None = None) -> dict:
        name = name or f"part-{len(self.shards):05d}.parquet"
        check_ids(user_ids, "user id", f"store {self.path} shard {name}", StoreError)
        user_ids = np.asarray(user_ids).astype(str)
        check_finite(user_ids, prompts, f"store {self.path}")
        self._register(user_ids)
        data, sha = encode_shard(user_ids, prompts)
        write_file(self.fs, join(self.root, SHARD_DIR, name), data)
        entry = {"name": name, "rows": len(user_ids), "sha256": sha}
        self.shards.append(entry)
        return entry

    def add_shard(self, entry: dict, user_ids) -> None:
        """A shard another process (a Ray worker) wrote into this store's shard folder, already read back and
        checked by the caller: listed in the manifest; a user some shard already holds is refused."""
        self._register(np.asarray(user_ids).astype(str))
        self.shards.append({"name": entry["name"], "rows": int(entry["rows"]), "sha256": entry["sha256"]})

    def _register(self, user_ids: np.ndarray) -> None:
        self._refuse_duplicates(user_ids)
        self._ids.append(user_ids)

    def _refuse_duplicates(self, user_ids: np.ndarray) -> None:
        ordered = np.sort(user_ids, kind="stable")
        twice = ordered[1:][ordered[1:] == ordered[:-1]]
        if len(twice):
            raise StoreError(f"store {self.path}: user {str(twice[0])!r} written twice")

    def write_head(self, state_dict: dict[str, torch.Tensor], head_config: dict) -> None:
        data = encode_head(state_dict, head_config, self.model)
        write_file(self.fs, join(self.root, HEAD), data)
        self._head_written, self._head_sha256 = True, sha256_hex(data)

    def close(self) -> Manifest:
        if not self._head_written:
            raise StoreError(f"store {self.path}: the task head was not written; no manifest")
        every = np.concatenate(self._ids) if self._ids else np.zeros(0, str)
        self._refuse_duplicates(every)  # across shards: before the manifest, so the store stays incomplete
        manifest = Manifest(model=asdict(self.model), prompt_length=self.l, hidden_size=self.model.hidden_size,
                            template=self.template, task=self.task, num_users=len(every),
                            shards=self.shards, lineage=self.lineage, provenance=self.provenance,
                            head_sha256=self._head_sha256)
        write_manifest(self.fs, self.root, manifest)
        return manifest


def write_store(path: str, model: ModelIdentity, user_ids, prompts: np.ndarray, head_state: dict,
                head_config: dict, *, template: dict, task: str, **kwargs) -> Manifest:
    """One call: all prompts + head → a complete store."""
    writer = StoreWriter(path, model, prompts.shape[1], template, task, **kwargs)
    writer.write(user_ids, prompts)
    writer.write_head(head_state, head_config)
    return writer.close()


class PromptStore:
    """A complete store, opened for reading; every shard read is checked against the manifest."""

    def __init__(self, path: str, manifest: Manifest, fs, root: str):
        self.path, self.manifest, self.fs, self.root = path, manifest, fs, root

    @classmethod
    def open(cls, path: str, storage: StorageOptions | None = None) -> "PromptStore":
        fs, root = filesystem(path, storage)
        mpath = join(root, MANIFEST)
        if not fs.exists(mpath):
            hint = "incomplete: an interrupted write, or not a store" if fs.exists(root) else "no such path"
            raise StoreError(f"store {path} has no {MANIFEST} ({hint}); refusing to read it")
        try:
            with fs.open(mpath, "r") as f:
                raw = json.load(f)
            manifest = Manifest(**raw)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise StoreError(f"store {path}: unreadable {MANIFEST} ({type(e).__name__}: {e}); an interrupted "
                             "write of an older puma_ray, or not a store") from None
        if manifest.format_version > FORMAT_VERSION:
            raise StoreError(f"store {path}: format {manifest.format_version} is newer than this package reads "
                             f"({FORMAT_VERSION})")
        check_manifest_names(manifest, f"store {path} {MANIFEST}")
        return cls(path, manifest, fs, root)

    @property
    def identity(self) -> ModelIdentity:
        return self.manifest.identity

    @property
    def prompt_shape(self) -> tuple[int, int]:
        return self.manifest.prompt_length, self.manifest.hidden_size

    def check_model(self, model: ModelIdentity) -> None:
        """Refuses a model other than the one the prompts were trained for (the store's whole point)."""
        mine = self.identity
        if mine.fingerprint != model.fingerprint:
            raise StoreError(f"store {self.path} belongs to model {mine.describe()}, not to {model.describe()}: "
                             "its prompts mean nothing to another model")

    def read_shard(self, entry: dict, finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(user_ids, prompts (n, l, d)) of one shard, verified: checksum, rows, width, and (unless `finite` is
        False: conversion rejects such users one by one instead) finite values."""
        where = f"store {self.path} shard {entry['name']}"
        data = self.read_listed(SHARD_DIR, entry, where)
        try:
            table = pq.read_table(pa.BufferReader(data))
        except pa.ArrowException as e:
            raise StoreError(f"{where}: unreadable parquet: {e}") from e
        l, d = self.prompt_shape
        col = table.column("prompt").combine_chunks()
        if not pa.types.is_fixed_size_list(col.type) or col.type.list_size != l * d:
            raise StoreError(f"{where}: prompt width {getattr(col.type, 'list_size', col.type)} != l*d = {l * d}")
        if table.num_rows != entry["rows"]:
            raise StoreError(f"{where}: {table.num_rows} rows, manifest says {entry['rows']}")
        check_id_column(table.column("user_id"), "user id", where, StoreError)
        user_ids = _id_array(table.column("user_id"))
        prompts = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, l, d)
        if finite:
            check_finite(user_ids, prompts, where)
        return user_ids, prompts

    def read_listed(self, folder: str, entry: dict, where: str) -> bytes:
        """The bytes of a file the manifest lists under `folder` ({"name", "sha256"}), checked: its name stays in
        the folder, it exists, its checksum is the manifest's."""
        try:
            with self.fs.open(child(join(self.root, folder), entry.get("name"), where, StoreError), "rb") as f:
                data = f.read()
        except FileNotFoundError as e:
            raise StoreError(f"{where}: missing") from e
        if sha256_hex(data) != entry.get("sha256"):
            raise StoreError(f"{where}: checksum mismatch (corrupt or replaced after the manifest was written)")
        return data

    def read_user_ids(self, entry: dict) -> np.ndarray:
        """Only the user_id column of one shard (parquet reads that column alone): cheap planning and checks."""
        with self.fs.open(child(join(self.root, SHARD_DIR), entry["name"], f"store {self.path} shards",
                                StoreError), "rb") as f:
            column = pq.read_table(f, columns=["user_id"]).column("user_id")
        check_id_column(column, "user id", f"store {self.path} shard {entry['name']}", StoreError)
        return _id_array(column)

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for entry in self.manifest.shards:
            yield self.read_shard(entry)

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """All users sorted by user_id, and their prompts; refuses duplicates and a wrong user count."""
        parts = list(self.iter_shards())
        if not parts:
            return np.array([], dtype=str), np.zeros((0, *self.prompt_shape), np.float32)
        ids = np.concatenate([p[0] for p in parts])
        prompts = np.concatenate([p[1] for p in parts])
        order = np.argsort(ids, kind="stable")
        ids, prompts = ids[order], prompts[order]
        dup = ids[1:][ids[1:] == ids[:-1]]
        if len(dup):
            raise StoreError(f"store {self.path}: user {str(dup[0])!r} appears more than once")
        if len(ids) != self.manifest.num_users:
            raise StoreError(f"store {self.path}: {len(ids)} users in shards, manifest says {self.manifest.num_users}")
        return ids, prompts

    def read_head(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(head weights, head config), checked against the manifest's checksum."""
        where = f"store {self.path} {HEAD}"
        try:
            with self.fs.open(join(self.root, HEAD), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise StoreError(f"{where}: missing") from None
        if self.manifest.head_sha256 is not None and sha256_hex(data) != self.manifest.head_sha256:
            raise StoreError(f"{where}: checksum mismatch (corrupt or replaced after the manifest was written)")
        try:  # the head's config lives in the safetensors header metadata: 8-byte length, then JSON
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
            return st_load(data), json.loads(meta["head_config"])
        except Exception as e:  # untrusted bytes: any parse failure is the same one line
            raise StoreError(f"{where}: not a head file this package writes ({type(e).__name__})") from None
