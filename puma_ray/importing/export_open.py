"""export --format open: a store back to the open formats an import reads (docs/bring-your-own.md), so that a
migrated system leaves this package as it came in: system.json (written last), prompts.parquet, optionally one
PEFT prompt-tuning folder per user, head.safetensors + head.json.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save as st_save

from puma_ray.artifacts.formats import (
    OPEN_HEAD_LAYERS,
    OPEN_HEAD_WEIGHTS,
    OPEN_PEFT_DIR,
    OPEN_PROMPTS,
    SYSTEM_FORMAT,
    SYSTEM_SPEC,
)
from puma_ray.artifacts.store import PromptStore, prompts_table
from puma_ray.errors import SystemImportError
from puma_ray.fs import StorageOptions, child, filesystem, join, write_file, write_json

from .readout import head_to_open
from .tables import PEFT_CONFIG, PEFT_TENSOR, PEFT_WEIGHTS


def _peft_config(l: int, d: int, identity) -> dict:
    """A prompt-tuning adapter_config.json as PEFT writes it (the keys its loader needs)."""
    return {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": l, "token_dim": d,
            "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM",
            "base_model_name_or_path": identity.name, "revision": identity.revision, "inference_mode": True}


def export_open(store_path: str, out_dir: str, peft: bool = False, storage: StorageOptions | None = None) -> dict:
    """Writes the store's system in open form into a new or empty folder; returns system.json."""
    store = PromptStore.open(store_path, storage)
    fs, root = filesystem(out_dir, storage)
    if fs.exists(root) and fs.ls(root, detail=False):
        raise SystemImportError(f"export folder {out_dir} is not empty; export to a new or empty folder")
    fs.makedirs(root, exist_ok=True)
    ids, prompts = store.read_all()
    import pyarrow as pa
    import pyarrow.parquet as pq
    sink = pa.BufferOutputStream()
    pq.write_table(prompts_table(ids, prompts), sink)
    write_file(fs, join(root, OPEN_PROMPTS), memoryview(sink.getvalue()))
    l, d = store.prompt_shape
    if peft:
        config = json.dumps(_peft_config(l, d, store.identity), indent=1).encode()
        for user, prompt in zip(ids, prompts):  # the folder's name is the user id: refused unless a plain name
            folder = child(join(root, OPEN_PEFT_DIR), str(user), f"user id {user!r} as a folder name",
                           SystemImportError)
            fs.makedirs(folder, exist_ok=True)
            write_file(fs, join(folder, PEFT_WEIGHTS), st_save({PEFT_TENSOR: torch.from_numpy(np.array(prompt))}))
            write_file(fs, join(folder, PEFT_CONFIG), config)
    tensors, layers = head_to_open(*store.read_head())
    readout = {"layers": OPEN_HEAD_LAYERS}
    if tensors:
        write_file(fs, join(root, OPEN_HEAD_WEIGHTS), st_save(tensors))
        readout["weights"] = OPEN_HEAD_WEIGHTS
    write_json(fs, join(root, OPEN_HEAD_LAYERS), layers)
    identity = store.identity
    system = {"format": SYSTEM_FORMAT, "task": store.manifest.task,
              "model": {"name": identity.name, "revision": identity.revision, "fingerprint": identity.fingerprint},
              "prompts": {"kind": "parquet", "path": OPEN_PROMPTS, "column": "prompt", "prompt_length": l},
              "template": store.manifest.template, "readout": readout,
              "exported_from": {"store": store_path, "users": int(len(ids))}}
    if peft:
        system["prompts_peft"] = {"kind": "peft", "path": OPEN_PEFT_DIR, "prompt_length": l}
    write_json(fs, join(root, SYSTEM_SPEC), system)  # last: a folder without it is an interrupted export
    return system
