"""Serving export: a store's prompts as plain `(l, d)` tensors per user, for an inference server that takes
`prompt_embeds` / `inputs_embeds` (vLLM, TGI, transformers).

    <dir>/prompts-<shard>.safetensors   tensor "prompt_embeds" (n, l, d); header metadata "user_ids" (JSON list)
    <dir>/export.json                   written last: model identity, l, d, dtype, template, files + sha256,
                                        the store it came from (manifest checksum), package version

`ServingPrompts` opens an export and returns one user's tensor without loading the others (safetensors slices).
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from puma_ray import __version__
from puma_ray.artifacts.formats import SERVING_EXPORT, SERVING_FORMAT, sha256_hex
from puma_ray.artifacts.store import MANIFEST, PromptStore, StoreError
from puma_ray.fs import StorageOptions, filesystem, join, plain_name, redact

EXPORT_FILE, TENSOR = SERVING_EXPORT, "prompt_embeds"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_for_serving(store_path: str, out_dir: str, dtype: str = "float32",
                       storage: StorageOptions | None = None) -> dict:
    """Every user of the store (verified shard by shard as it is read) → safetensors files; returns export.json."""
    if dtype not in DTYPES:
        raise StoreError(f"export dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    store = PromptStore.open(store_path, storage)
    fs, root = filesystem(out_dir, storage)
    if fs.exists(join(root, EXPORT_FILE)):
        fs.rm(join(root, EXPORT_FILE))  # first: a half-replaced export reads as incomplete
    fs.makedirs(root, exist_ok=True)
    files = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in store.manifest.shards:
            ids, prompts = store.read_shard(entry)
            name = "prompts-" + entry["name"].rsplit(".", 1)[0] + ".safetensors"
            local = os.path.join(tmp, name)
            save_file({TENSOR: torch.from_numpy(prompts).to(DTYPES[dtype]).contiguous()}, local,
                      metadata={"user_ids": json.dumps([str(u) for u in ids]), "model": store.identity.fingerprint})
            with open(local, "rb") as f:
                sha = sha256_hex(f.read())
            fs.put(local, join(root, name))
            os.remove(local)
            files.append({"file": name, "users": len(ids), "sha256": sha})
    with store.fs.open(join(store.root, MANIFEST), "rb") as f:
        store_sha = sha256_hex(f.read())
    export = {"format": SERVING_FORMAT, "created_by": f"puma_ray {__version__}", "model": store.manifest.model,
              "prompt_length": store.manifest.prompt_length, "hidden_size": store.manifest.hidden_size,
              "dtype": dtype, "template": store.manifest.template, "task": store.manifest.task,
              "users": store.manifest.num_users, "files": files,
              "store": {"path": store_path, "manifest_sha256": store_sha}}
    with fs.open(join(root, EXPORT_FILE), "w") as f:
        json.dump(redact(export), f, indent=1)
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
