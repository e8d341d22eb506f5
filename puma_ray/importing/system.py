"""A user's own 1+N system described by `system.json` (docs/bring-your-own.md), read and checked as a whole.

system.json (format puma_ray.system/1), every path relative to its folder and staying inside it:
    {"format": "puma_ray.system/1", "task": "rating",
     "model": {"name": "<local folder | hub id>", "revision": null},
     "prompts": {"kind": "parquet" | "npy" | "safetensors" | "peft", "path": "...", "column": "prompt",
                 "user_ids": "<JSON id list, npy/safetensors>", "prompt_length": 4},
     "template": {"text": "... <UserID> ... <ItemTitle> ...", "labels": ["1", ..., "5"], ...TemplateConfig},
     "readout": {"weights": "head.safetensors", "layers": "head.json"}  or  {"layers": "head.json"} (verbalizer),
     "records": "records.csv", "items": "items.csv"}                    (logs: optional)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from puma_ray.artifacts.formats import SYSTEM_FORMAT, SYSTEM_SPEC, check_format
from puma_ray.config import TemplateConfig, from_dict
from puma_ray.errors import ConfigError, SystemImportError
from puma_ray.fs import StorageOptions, filesystem, is_remote, join, plain_name

from .tables import read_array_table, read_json_bounded, read_parquet_table, read_peft_folders

PROMPT_KINDS = ("parquet", "npy", "safetensors", "peft")


def inside(root: str, relative, where: str) -> str:
    """root/relative for a relative path read from system.json: every part a plain name (no "..", no absolute
    path), so an imported system's files stay inside its folder."""
    if not isinstance(relative, str) or not relative:
        raise SystemImportError(f"{where}: {relative!r} is not a relative path")
    parts = [plain_name(p, where, SystemImportError) for p in relative.split("/")]
    return join(root, *parts)


@dataclass
class SystemSpec:
    folder: str  # where system.json lies (local or s3://)
    task: str
    model: dict  # {"name", "revision"}
    prompts: dict
    template: TemplateConfig
    readout: dict
    records: str | None  # full paths, or None: no logs given (the user checks against logs are then skipped)
    items: str | None
    raw: dict  # system.json as read

    def path(self, relative, where: str) -> str:
        return inside(self.folder.rstrip("/"), relative, f"{self.folder}/{SYSTEM_SPEC} {where}")

    def model_location(self) -> str:
        """The model's name as the loader takes it: a folder inside a local system folder, a local folder, or a
        hub id (resolved from the local HF cache only)."""
        name = self.model.get("name")
        if not isinstance(name, str) or not name:
            raise SystemImportError(f"{self.folder}/{SYSTEM_SPEC} model.name: missing")
        if not is_remote(self.folder) and not os.path.isabs(name):
            candidate = os.path.join(self.folder.removeprefix("file://"), name)
            if os.path.isdir(candidate):
                return self.path(name, "model.name").removeprefix("file://")
        return name


def read_system(folder: str, storage: StorageOptions | None = None) -> SystemSpec:
    fs, root = filesystem(folder, storage)
    where = f"{folder}/{SYSTEM_SPEC}"
    raw = read_json_bounded(fs, join(root, SYSTEM_SPEC), where, 1 << 20)
    if not isinstance(raw, dict):
        raise SystemImportError(f"{where}: not a JSON object")
    check_format(raw.get("format"), SYSTEM_FORMAT, where, SystemImportError)
    missing = [k for k in ("task", "model", "prompts", "template", "readout") if k not in raw]
    if missing:
        raise SystemImportError(f"{where}: lacks {missing}")
    if raw["task"] not in ("rating", "ctr"):
        raise SystemImportError(f"{where} task: {raw['task']!r}; known: rating, ctr")
    for key in ("model", "prompts", "template", "readout"):
        if not isinstance(raw[key], dict):
            raise SystemImportError(f"{where} {key}: not a JSON object")
    if raw["prompts"].get("kind") not in PROMPT_KINDS:
        raise SystemImportError(f"{where} prompts.kind: {raw['prompts'].get('kind')!r}; known: {list(PROMPT_KINDS)}")
    try:
        template = from_dict(TemplateConfig, raw["template"], f"{where} template")
    except ConfigError as e:
        raise SystemImportError(str(e)) from None
    spec = SystemSpec(folder.rstrip("/"), raw["task"], raw["model"], raw["prompts"], template, raw["readout"],
                      None, None, raw)
    if ("records" in raw) != ("items" in raw):
        raise SystemImportError(f"{where}: logs need both records and items (or neither)")
    if "records" in raw:
        spec.records, spec.items = spec.path(raw["records"], "records"), spec.path(raw["items"], "items")
    return spec


def read_prompts(spec: SystemSpec, storage: StorageOptions | None = None):
    """(user ids, prompts as (n, l*d) or (n, l, d)) in whichever form system.json names."""
    p, kind = spec.prompts, spec.prompts["kind"]
    path = spec.path(p.get("path"), "prompts.path")
    if kind == "parquet":
        return read_parquet_table(path, p.get("column", "prompt"), storage)
    if kind == "peft":
        return read_peft_folders(path, storage)
    if not path.endswith(f".{'npy' if kind == 'npy' else 'safetensors'}"):
        raise SystemImportError(f"{spec.folder}/{SYSTEM_SPEC} prompts.path: a {kind} table must end in .{kind}")
    return read_array_table(path, spec.path(p.get("user_ids"), "prompts.user_ids"), storage)
