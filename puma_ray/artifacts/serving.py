"""Serving export: a store's prompts as plain `(l, d)` tensors per user, for an inference server that takes
`prompt_embeds` / `inputs_embeds` (vLLM, TGI, transformers), and with `splice` the rest of the request: the
template's fixed pieces embedded once, where the user's rows and the item go, and the readout (serving_splice.py).

    <dir>/prompts-<shard>.safetensors   tensor "prompt_embeds" (n, l, d); header metadata "user_ids" (JSON list)
    <dir>/splice.json, template_pieces.safetensors, readout.safetensors, head.safetensors, head.json
                                        with splice only: the recipe and its tensors (serving_splice.py)
    <dir>/export.json                   written last: model identity, l, d, dtype, template, files + sha256,
                                        "splice" (its files + sha256, or absent), the store it came from (manifest
                                        checksum), package version
    <dir>/_export_pending.json          while an export runs: the files it writes (an interrupted export's files
                                        are then known as ours by the rerun); removed after export.json

`ServingPrompts` / `SplicedSystem` (serving_reader.py, no model code) open an export: one user's rows without
loading the others, or the whole assembled sequence and the prediction.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save as save_tensors

from puma_ray import __version__
from puma_ray.artifacts.formats import (
    ADAPTER_CONFIG,
    ADAPTER_CONFIG_LEGACY,
    CONVERSION_IDENTITY,
    OUTPUT_LOCK,
    SERVING_EXPORT,
    SERVING_EXPORT_PENDING,
    SERVING_FORMAT,
    SERVING_SPLICE,
    SERVING_SPLICE_FORMAT,
    STORE_MANIFEST,
    sha256_hex,
)
from puma_ray.artifacts.lock import OutputLock
from puma_ray.artifacts.serving_reader import TENSOR, ServingPrompts
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

EXPORT_FILE, EXPORT_PENDING = SERVING_EXPORT, SERVING_EXPORT_PENDING
__all__ = ["ServingPrompts", "export_for_serving", "check_export_location", "DTYPES"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _export_names(store: PromptStore) -> list[str]:
    return ["prompts-" + plain_name(e["name"], f"store {store.path} shards", StoreError).rsplit(".", 1)[0]
            + ".safetensors" for e in store.manifest.shards]


# what a store, an adapter or a conversion output holds at its top: an export never goes inside one of them
_ARTIFACT_MARKERS = (STORE_MANIFEST, ADAPTER_CONFIG, ADAPTER_CONFIG_LEGACY, CONVERSION_IDENTITY)


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
        splice = data.get("splice") if isinstance(data.get("splice"), dict) else {}
        for entry in data["files"] + list(splice.get("files") or []):
            name = entry.get("file") if isinstance(entry, dict) else entry
            ours.add(child(root, name, f"export {out_dir} {record} files", StoreError))
    return ours


def export_for_serving(store_path: str, out_dir: str, dtype: str = "float32",
                       storage: StorageOptions | None = None, splice: bool = False,
                       model: str | None = None) -> dict:
    """Every user of the store (verified shard by shard as it is read) → safetensors files; returns export.json.
    `splice` adds the template's pieces and the readout, built from the store's model (`model`: where it is on
    this machine when the store's recorded name does not load here; its fingerprint must still match).

    Output rules (as a conversion's): the folder is new, empty, or an export of ours (its files named by our
    export.json or by the pending record of an interrupted export); a file we did not write is never overwritten
    or deleted: the export is refused naming it. Every file is written atomically; export.json last."""
    if dtype not in DTYPES:
        raise StoreError(f"export dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    store = PromptStore.open(store_path, storage)
    fs, root = filesystem(out_dir, storage)
    check_export_location(store_path, out_dir, fs, root)
    extra: dict[str, bytes] = {}
    if splice:  # built before anything is written: a model that does not load or match refuses an untouched folder
        from puma_ray.artifacts.serving_splice import build_splice  # loads transformers: only an export that splices
        extra = build_splice(store, DTYPES[dtype], model)
    with OutputLock(out_dir, "an export", storage):  # one writer: a second export into the folder is refused
        return _export_locked(store, store_path, out_dir, dtype, fs, root, extra)


def _export_locked(store: PromptStore, store_path: str, out_dir: str, dtype: str, fs, root: str,
                   extra: dict[str, bytes]) -> dict:
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
    write_json(fs, join(root, EXPORT_PENDING), {"format": SERVING_FORMAT, "files": names + list(extra),
                                                "store": store_path})
    files = []
    for entry, name in zip(store.manifest.shards, names):
        ids, prompts = store.read_shard(entry)
        # a writable copy: torch warns on a read-only numpy buffer (Arrow's), and the dtype cast copies anyway
        tensor = torch.from_numpy(np.array(prompts, dtype=np.float32, copy=True)).to(DTYPES[dtype]).contiguous()
        data = save_tensors({TENSOR: tensor}, metadata={"user_ids": json.dumps([str(u) for u in ids]),
                                                        "model": store.identity.fingerprint})
        write_file(fs, join(root, name), data)
        files.append({"file": name, "users": len(ids), "sha256": sha256_hex(data)})
    spliced = []
    for name, data in extra.items():  # splice.json last of them (build_splice's order)
        write_file(fs, join(root, name), data)
        spliced.append({"file": name, "sha256": sha256_hex(data)})
    with store.fs.open(join(store.root, MANIFEST), "rb") as f:
        store_sha = sha256_hex(f.read())
    export = {"format": SERVING_FORMAT, "created_by": f"puma_ray {__version__}", "model": store.manifest.model,
              "prompt_length": store.manifest.prompt_length, "hidden_size": store.manifest.hidden_size,
              "dtype": dtype, "template": store.manifest.template, "task": store.manifest.task,
              "users": store.manifest.num_users, "files": files,
              "store": {"path": store_path, "manifest_sha256": store_sha}}
    if extra:
        export["splice"] = {"file": SERVING_SPLICE, "format": SERVING_SPLICE_FORMAT, "files": spliced}
    write_json(fs, join(root, EXPORT_FILE), export)
    fs.rm(join(root, EXPORT_PENDING))  # ours: export.json now names every file
    return export
