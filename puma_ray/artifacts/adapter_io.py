"""The adapter artifact: puma_adapter.json (architecture, dims, scales, the models, data, config and package
that made it, written last) + adapter.safetensors + head.safetensors. Symmetric save/load; load refuses a format
it does not know with one line. An adapter written before the config file's rename (adapter_config.json, PEFT's
name for another schema) still loads: `adapter_config_name` is the one reader of the old name.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict

from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn

from puma_ray import __version__
from puma_ray.artifacts.formats import (
    ADAPTER_CONFIG,
    ADAPTER_CONFIG_LEGACY,
    ADAPTER_FORMAT,
    ADAPTER_HEAD,
    ADAPTER_WEIGHTS,
    check_format,
)
from puma_ray.config import from_dict
from puma_ray.errors import AdapterError
from puma_ray.fs import StorageOptions, filesystem, join, write_file, write_json
from puma_ray.models.adapter import AdapterConfig, PromptAdapter, num_parameters
from puma_ray.models.heads import load_head

CONFIG_FILE, WEIGHTS_FILE, HEAD_FILE = ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_HEAD


def save_adapter(folder: str, adapter: PromptAdapter, head: nn.Module, head_cfg: dict, meta: dict,
                 storage: StorageOptions | None = None) -> str:
    """puma_adapter.json (architecture, dims, scales, fingerprints, training, selection, metrics, version)
    + adapter.safetensors + head.safetensors (the target head trained alongside). Config last: it marks done."""
    fs, root = filesystem(folder, storage)
    fs.makedirs(root, exist_ok=True)
    for name, tensors in ((WEIGHTS_FILE, adapter.state_dict()), (HEAD_FILE, head.state_dict())):
        write_file(fs, join(root, name), save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
    config = {
        "format": ADAPTER_FORMAT, "package": f"puma_ray {__version__}",
        "architecture": asdict(adapter.cfg), "source_dims": adapter.source_dims, "target_dim": adapter.target_dim,
        "num_parameters": num_parameters(adapter), "head": head_cfg, **meta,
    }
    write_json(fs, join(root, CONFIG_FILE), config)  # last, atomically: marks the adapter complete
    return folder


def adapter_config_name(fs, root: str, folder: str) -> str:
    """The adapter's config file name: puma_adapter.json, or adapter_config.json in an adapter written before the
    rename (the same schema and format id). Neither: one line, the folder is incomplete or not an adapter."""
    for name in (CONFIG_FILE, ADAPTER_CONFIG_LEGACY):
        if fs.exists(join(root, name)):
            return name
    raise AdapterError(f"adapter {folder} has no {CONFIG_FILE} (incomplete or not an adapter)")


def load_adapter(folder: str, storage: StorageOptions | None = None) -> tuple[PromptAdapter, nn.Module, dict]:
    fs, root = filesystem(folder, storage)
    name = adapter_config_name(fs, root, folder)
    with fs.open(join(root, name), "r") as f:
        try:
            config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(f"adapter {folder}: {name} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {folder}: {name} is not a JSON object")
    check_format(config.get("format"), ADAPTER_FORMAT, f"adapter {folder} ({name})", AdapterError)
    with tempfile.TemporaryDirectory() as tmp:
        tensors = {}
        for name in (WEIGHTS_FILE, HEAD_FILE):
            local = os.path.join(tmp, name)
            fs.get(join(root, name), local)
            try:
                tensors[name] = load_file(local)
            except Exception:  # untrusted bytes: any parse failure is one line naming the file
                raise AdapterError(f"adapter {folder}: {name} is not a valid safetensors file") from None
    architecture = from_dict(AdapterConfig, config.get("architecture"), f"adapter {folder} architecture")
    adapter = PromptAdapter(config["source_dims"], config["target_dim"], architecture)
    adapter.load_state_dict(tensors[WEIGHTS_FILE])
    adapter.eval()
    return adapter, load_head(tensors[HEAD_FILE], config["head"]), config


def check_sources(config: dict, identities: list) -> None:
    """Refuses stores whose models are not the adapter's sources (in order): their prompts mean nothing to it."""
    expected = config["sources"]
    if len(identities) != len(expected):
        raise AdapterError(f"adapter was fitted on {len(expected)} source model(s), got {len(identities)} store(s)")
    for want, got in zip(expected, identities):
        if want["fingerprint"] != got.fingerprint:
            raise AdapterError(f"adapter expects prompts of {want['name']} (fingerprint {want['fingerprint'][:12]}), "
                               f"but the store belongs to {got.describe()}")
