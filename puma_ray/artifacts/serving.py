"""Serving export: a store's prompts as plain `(l, d)` tensors per user, for an inference server that takes
`prompt_embeds` / `inputs_embeds` (vLLM, TGI, transformers).

    <dir>/prompts-<shard>.safetensors   tensor "prompt_embeds" (n, l, d); header metadata "user_ids" (JSON list)
    <dir>/export.json                   written last: model identity, l, d, dtype, template, files + sha256,
                                        the store it came from (manifest checksum), package version
    <dir>/_export_pending.json          while an export runs: the files it writes (an interrupted export's files
                                        are then known as ours by the rerun); removed after export.json

`ServingPrompts` opens an export and returns one user's tensor without loading the others (safetensors slices).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors

from puma_ray import __version__
from puma_ray.artifacts.formats import (
    ADAPTER_CONFIG,
    CONVERSION_IDENTITY,
    OUTPUT_LOCK,
    SERVING_EXPORT,
    SERVING_EXPORT_PENDING,
    SERVING_FORMAT,
    STORE_MANIFEST,
    sha256_hex,
)
from puma_ray.artifacts.lock import OutputLock
from puma_ray.artifacts.store import MANIFEST, PromptStore, StoreError
from puma_ray.fs import (
    StorageOptions,
    child,
    filesystem,
    is_temp_file,
    join,
    plain_name,
    read_json,
    relation,
    write_file,
    write_json,
)

EXPORT_FILE, EXPORT_PENDING, TENSOR = SERVING_EXPORT, SERVING_EXPORT_PENDING, "prompt_embeds"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _export_names(store: PromptStore) -> list[str]:
    return ["prompts-" + plain_name(e["name"], f"store {store.path} shards", StoreError).rsplit(".", 1)[0]
            + ".safetensors" for e in store.manifest.shards]


# what a store, an adapter or a conversion output holds at its top: an export never goes inside one of them
_ARTIFACT_MARKERS = (STORE_MANIFEST, ADAPTER_CONFIG, CONVERSION_IDENTITY)


def check_export_location(store_path: str, out_dir: str, fs, root: str) -> None:
    """The export folder is neither the store, inside it or around it, nor inside any store, adapter or
    conversion output (an export there would mix files into an artifact whose manifest does not list them)."""
    how = relation(out_dir, store_path)
    if how:
        raise StoreError(f"export folder {out_dir} {how} the store {store_path}: export to a folder of its own")
    folder = root.rstrip("/")
    while folder and folder not in ("/", "."):
        for marker in _ARTIFACT_MARKERS:
            if fs.exists(join(folder, marker)):
                raise StoreError(f"export folder {out_dir} is inside {folder}, which holds {marker} (a store, "
                                 "an adapter or a conversion output): export to a folder of its own")
        parent = folder.rsplit("/", 1)[0] if "/" in folder else ""
        if parent == folder:
            break
        folder = parent


def _owned_files(fs, root: str, present: set[str], out_dir: str) -> set[str]:
    """The files of `out_dir` this package wrote: those an export.json of our format lists (itself included) and
    those a pending record of an interrupted export names. Unreadable or foreign ones own nothing."""
    ours: set[str] = set()
    for record in (EXPORT_FILE, EXPORT_PENDING):
        path = join(root, record)
        if path not in present:
            continue
        try:
            data = read_json(fs, path, f"export {out_dir} {record}", StoreError)
        except StoreError:
            data = None
        if not isinstance(data, dict) or data.get("format") != SERVING_FORMAT or not isinstance(
                data.get("files"), list):
            if record == EXPORT_PENDING:
                ours.add(path)  # a pending record that is not readable is still our own name: a partial write
            continue
        ours.add(path)
        for entry in data["files"]:
            name = entry.get("file") if isinstance(entry, dict) else entry
            ours.add(child(root, name, f"export {out_dir} {record} files", StoreError))
    return ours


def export_for_serving(store_path: str, out_dir: str, dtype: str = "float32",
                       storage: StorageOptions | None = None) -> dict:
    """Every user of the store (verified shard by shard as it is read) → safetensors files; returns export.json.

    Output rules (as a conversion's): the folder is new, empty, or an export of ours (its files named by our
    export.json or by the pending record of an interrupted export); a file we did not write is never overwritten
    or deleted: the export is refused naming it. Every file is written atomically; export.json last."""
    if dtype not in DTYPES:
        raise StoreError(f"export dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    store = PromptStore.open(store_path, storage)
    fs, root = filesystem(out_dir, storage)
    check_export_location(store_path, out_dir, fs, root)
    with OutputLock(out_dir, "an export", storage):  # one writer: a second export into the folder is refused
        return _export_locked(store, store_path, out_dir, dtype, fs, root)


def _export_locked(store: PromptStore, store_path: str, out_dir: str, dtype: str, fs, root: str) -> dict:
    present = {p.rstrip("/") for p in fs.find(root)} if fs.exists(root) else set()
    for leftover in sorted(p for p in present if is_temp_file(p)):
        fs.rm(leftover)  # a temporary file of our own atomic write
    present = {p for p in present if not is_temp_file(p) and p != join(root, OUTPUT_LOCK)}
    foreign = present - _owned_files(fs, root, present, out_dir)
    if foreign:
        raise StoreError(f"export folder {out_dir} holds {sorted(foreign)[0]}, which this package did not write "
                         f"there ({len(foreign)} such file(s)); export to a new or empty folder")
    names = _export_names(store)
    if join(root, EXPORT_FILE) in present:
        fs.rm(join(root, EXPORT_FILE))  # ours (checked above), first: a half-replaced export reads as incomplete
    fs.makedirs(root, exist_ok=True)
    # before any prompt file: names every file this export will write, so an interrupted export's files are
    # known as ours by the rerun (and only those)
    write_json(fs, join(root, EXPORT_PENDING), {"format": SERVING_FORMAT, "files": names, "store": store_path})
    files = []
    for entry, name in zip(store.manifest.shards, names):
        ids, prompts = store.read_shard(entry)
        # a writable copy: torch warns on a read-only numpy buffer (Arrow's), and the dtype cast copies anyway
        tensor = torch.from_numpy(np.array(prompts, dtype=np.float32, copy=True)).to(DTYPES[dtype]).contiguous()
        data = save_tensors({TENSOR: tensor}, metadata={"user_ids": json.dumps([str(u) for u in ids]),
                                                        "model": store.identity.fingerprint})
        write_file(fs, join(root, name), data)
        files.append({"file": name, "users": len(ids), "sha256": sha256_hex(data)})
    with store.fs.open(join(store.root, MANIFEST), "rb") as f:
        store_sha = sha256_hex(f.read())
    export = {"format": SERVING_FORMAT, "created_by": f"puma_ray {__version__}", "model": store.manifest.model,
              "prompt_length": store.manifest.prompt_length, "hidden_size": store.manifest.hidden_size,
              "dtype": dtype, "template": store.manifest.template, "task": store.manifest.task,
              "users": store.manifest.num_users, "files": files,
              "store": {"path": store_path, "manifest_sha256": store_sha}}
    write_json(fs, join(root, EXPORT_FILE), export)
    fs.rm(join(root, EXPORT_PENDING))  # ours: export.json now names every file
    return export


class ServingPrompts:
    """A local export opened for lookups: `get(user_id)` → (l, d) tensor; `users` lists every user."""

    def __init__(self, folder: str):
        path = os.path.join(folder, EXPORT_FILE)
        if not os.path.exists(path):
            raise StoreError(f"{folder} has no {EXPORT_FILE} (incomplete export, or not one)")
        with open(path) as f:
            self.export = json.load(f)
        self.folder, self._where = folder, {}
        for entry in self.export["files"]:
            plain_name(entry.get("file"), f"export {folder} {EXPORT_FILE} files", StoreError)
            with safe_open(os.path.join(folder, entry["file"]), "pt") as f:
                ids = json.loads(f.metadata()["user_ids"])
            self._where.update({u: (entry["file"], row) for row, u in enumerate(ids)})

    @property
    def users(self) -> list[str]:
        return list(self._where)

    def get(self, user_id: str) -> torch.Tensor:
        return self.batch([user_id])[0]

    def batch(self, user_ids: list[str]) -> torch.Tensor:
        """(n, l, d) in the order asked; each file is opened once per call, however many of its users are asked."""
        missing = [u for u in user_ids if u not in self._where]
        if missing:
            raise KeyError(f"user {missing[0]!r} is not in the export {self.folder}")
        if not user_ids:
            return torch.empty(0)
        by_file: dict[str, list[int]] = {}
        for i, u in enumerate(user_ids):
            by_file.setdefault(self._where[u][0], []).append(i)
        out: list[torch.Tensor | None] = [None] * len(user_ids)
        for file, positions in by_file.items():
            with safe_open(os.path.join(self.folder, file), "pt") as f:
                rows = f.get_slice(TENSOR)
                for i in positions:
                    row = self._where[user_ids[i]][1]
                    out[i] = rows[row:row + 1][0]
        return torch.stack(out)
