"""import: a user's own 1+N system → a verified store bound to their model (fingerprint computed here).

Everything is read and checked first (tables.py, checks.py); only then is the store written (shards, head,
manifest last, each file atomic), so a refused import writes nothing.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from puma_ray.artifacts.formats import SYSTEM_SPEC, sha256_hex
from puma_ray.artifacts.store import PROMPT_SCALE_BOUND, Manifest, StoreWriter
from puma_ray.config import to_dict
from puma_ray.errors import SystemImportError, TemplateError
from puma_ray.fs import StorageOptions, filesystem, join

from .checks import finite_and_unique, prompt_shape, scale_report, template_renders, users_match_logs
from .readout import head_from_open
from .system import SystemSpec, read_prompts, read_system
from .tables import read_bounded, read_json_bounded


@dataclass
class ImportConfig:
    system: str  # the folder (local or s3://) holding system.json and the files it names
    output: str  # the store to write (local or s3://)
    # prompts whose RMS is this many x off the model's embedding RMS are refused: the store's own bound (a bug
    # upstream that scaled prompts by 1e6 would otherwise carry over into the migration unnoticed)
    max_scale_ratio: float = PROMPT_SCALE_BOUND
    allow_out_of_scale: bool = False  # import such prompts anyway (counted in the store's provenance)
    overwrite: bool = False  # replace an existing store at `output`; off: an existing store is refused
    shard_rows: int = 65_536  # the store's bound on rows per shard (as every store: bounded reads later)
    storage: StorageOptions = field(default_factory=StorageOptions)  # S3 endpoint/keys for s3:// paths


def _resolve_model(name: str, revision: str | None) -> str:
    """A local folder as it is; a hub id resolved from the local HF cache only (nothing is downloaded here)."""
    if os.path.isdir(name) or name.startswith("tiny:"):  # tiny:<family>: this package's own test models
        return name
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name, revision=revision, local_files_only=True)
    except Exception as e:  # not cached, or an id the hub client refuses: one line
        raise SystemImportError(f"model {name!r} (revision {revision}) is neither a local folder nor in the local "
                                f"Hugging Face cache ({type(e).__name__}); this import downloads nothing") from None


def _load_model(spec: SystemSpec):
    from puma_ray.models.backbone import load_backbone
    name, revision = spec.model_location(), spec.model.get("revision")
    backbone = load_backbone(_resolve_model(name, revision), None, spec.model.get("dtype", "float32"))
    if not os.path.isdir(name) and not name.startswith("tiny:"):  # a hub id: the identity names it as the user does
        backbone.identity.name, backbone.identity.revision = name, revision
    return backbone


def _head(spec: SystemSpec, storage) -> tuple[dict, dict]:
    readout, where = spec.readout, f"{spec.folder}/{SYSTEM_SPEC} readout"
    layers_path = spec.path(readout.get("layers"), "readout.layers")
    fs, inner = filesystem(layers_path, storage)
    layers = read_json_bounded(fs, inner, f"head layers {layers_path}", 1 << 20)
    tensors = {}
    if readout.get("weights") is not None:
        weights_path = spec.path(readout["weights"], "readout.weights")
        fs, inner = filesystem(weights_path, storage)
        try:
            from safetensors.torch import load as st_load
            tensors = st_load(read_bounded(fs, inner, f"head weights {weights_path}", 256 << 20))
        except SystemImportError:
            raise
        except Exception as e:  # untrusted bytes
            raise SystemImportError(f"head weights {weights_path}: not a safetensors file "
                                    f"({type(e).__name__})") from None
    elif isinstance(layers, dict) and layers.get("kind") != "verbalizer":
        raise SystemImportError(f"{where}: a head of kind {layers.get('kind')!r} needs readout.weights")
    return head_from_open(layers, tensors, spec.task, len(spec.template.labels), f"head layers {layers_path}")


def import_system(cfg: ImportConfig, log=print) -> Manifest:
    """Reads, checks and writes; returns the new store's manifest. Every refusal is one SystemImportError."""
    started = time.perf_counter()
    storage = cfg.storage
    spec = read_system(cfg.system, storage)
    where = f"prompt table {spec.path(spec.prompts.get('path'), 'prompts.path')}"
    user_ids, prompts = read_prompts(spec, storage)
    backbone = _load_model(spec)
    d = backbone.identity.hidden_size
    prompts = prompt_shape(prompts, d, spec.prompts.get("prompt_length"), where)
    finite_and_unique(user_ids, prompts, where)
    from puma_ray.models.backbone import embedding_rms
    scale = scale_report(user_ids, prompts, embedding_rms(backbone.model), cfg.max_scale_ratio,
                         cfg.allow_out_of_scale, where)
    template_where = f"{spec.folder}/{SYSTEM_SPEC} template"
    template_renders(spec.template, backbone.tokenizer, template_where)
    logs = None
    if spec.records:
        from puma_ray.data.generic import load_generic
        logs = load_generic(spec.records, spec.items, spec.task, storage=storage)
        users_match_logs(user_ids, logs.users, where, f"records {spec.records}")
    from puma_ray.models.prompted_lm import SLOT, PromptedLM
    texts = dict(zip(logs.items["item_id"], logs.items["text"])) if logs is not None else {"probe": "probe"}
    try:  # the whole rendering as the migration will do it: label tokens single, the slot of l positions
        plm = PromptedLM(backbone, spec.template, prompts.shape[1], texts, prefix_cache_mib=0)
        rendered = plm.sequence(next(iter(texts)), [] if "<History>" in spec.template.text else None)
    except TemplateError as e:
        raise SystemImportError(f"{template_where}: {e}") from None
    if rendered.count(SLOT) != prompts.shape[1]:
        raise SystemImportError(f"{template_where}: the rendering holds {rendered.count(SLOT)} prompt positions, "
                                f"the prompts have {prompts.shape[1]}")
    head_state, head_cfg = _head(spec, storage)
    checked_s = time.perf_counter() - started
    fs, root = filesystem(cfg.system, storage)
    system_sha = sha256_hex(read_bounded(fs, join(root, SYSTEM_SPEC), SYSTEM_SPEC, 1 << 20))
    writer = StoreWriter(cfg.output, backbone.identity, prompts.shape[1], to_dict(spec.template), spec.task,
                         shard_rows=cfg.shard_rows, storage=storage, overwrite=cfg.overwrite,
                         lineage={"kind": "imported", "system": cfg.system, "system_sha256": system_sha,
                                  "prompts": spec.prompts["kind"]},
                         provenance={"scale": scale, "logs": logs.provenance if logs is not None else None})
    order = np.argsort(user_ids, kind="stable")  # sorted: the canonical user order of every store
    writer.write(user_ids[order], prompts[order])
    writer.write_head({k: torch.as_tensor(v) for k, v in head_state.items()}, head_cfg)
    manifest = writer.close()
    log(f"imported {len(user_ids)} users (l={prompts.shape[1]}, d={d}) of {backbone.identity.describe()}; prompt RMS "
        f"{scale['median_ratio']:.3g}x the embedding RMS; checks {checked_s:.2f} s, total "
        f"{time.perf_counter() - started:.2f} s → {cfg.output}")
    return manifest
