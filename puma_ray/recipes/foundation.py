"""Small foundation models that know a dataset's domain: `foundation:<family>` in a model config.

A real LLM knows movies from its pretraining; a random tiny model knows nothing, so prompts on it carry only a
user's rating level (docs/measurements.md). This stage makes the testbed honest: a model of one of the five
families is trained, all of its weights, on the dataset's **train split only**, in the "1+N" shape itself: the
task template with a throwaway learned vector per user in the user slot, read out at the label tokens with the
task loss. Then the user vectors are discarded and the model is frozen and saved as an ordinary HF folder: it has
learned to read a preference vector, and every user's real prompt is then trained from scratch by Eq. 1.

Cached by everything that determines its weights (family, FoundationConfig, seed, template, task, the train
records and the train items' texts), in a folder named after them; the card (`foundation_card.json`) is written
last and marks the folder complete, and the folder is moved into place atomically.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import fsspec
import pandas as pd

from puma_ray.artifacts.formats import FOUNDATION_CARD, FOUNDATION_FORMAT
from puma_ray.config import FoundationConfig, ModelConfig, TemplateConfig, task_template, to_dict
from puma_ray.fs import write_file
from puma_ray.models.backbone import quiet_library_progress, weight_fingerprint
from puma_ray.training.pretrain import pretrain

PREFIX = "foundation:"
CARD, FORMAT = FOUNDATION_CARD, FOUNDATION_FORMAT  # in the cache key: a recipe change here must not reuse old folders
RECORD_COLUMNS = ["user_id", "item_id", "label", "timestamp"]
# FoundationConfig fields newer than the cached folders: at these values they leave the cache key unchanged (the
# folders made before item_tokens had none: a config asking for none still finds them)
ADDED_FIELDS = {"tie_embeddings": None, "user_dropout": 0.0, "item_tokens": False}


def is_foundation(name: str) -> bool:
    return name.startswith(PREFIX)


def train_fingerprint(train: pd.DataFrame) -> str:
    """sha256 of the train records (order-independent): the data a foundation read, in its card and cache key."""
    cols = [c for c in RECORD_COLUMNS if c in train.columns]
    ordered = train[cols].sort_values(cols, kind="stable").reset_index(drop=True)
    return hashlib.sha256(pd.util.hash_pandas_object(ordered, index=False).to_numpy().tobytes()).hexdigest()


def train_item_texts(train: pd.DataFrame, items: pd.DataFrame) -> dict[str, str]:
    """Texts of the items the train split touches (CTR histories included): all the pretraining may see."""
    touched = set(train["item_id"])
    if "history" in train.columns:
        touched.update(i for h in train["history"] for i in h)
    known = items[items["item_id"].isin(touched)].sort_values("item_id")
    return dict(zip(known["item_id"], known["text"]))


def cache_key(family: str, seed: int, cfg: FoundationConfig, template: TemplateConfig, task: str,
              train_fp: str, texts: dict[str, str]) -> str:
    texts_fp = hashlib.sha256(json.dumps(sorted(texts.items())).encode()).hexdigest()
    config = to_dict(cfg)
    for name, default in ADDED_FIELDS.items():  # at their defaults: the keys of the folders made before the fields
        if config.get(name) == default:
            config.pop(name, None)
    words = to_dict(template)
    words.pop("wording", None)  # its name: the text it resolved to is in the key
    blob = json.dumps({"format": FORMAT, "family": family, "seed": seed, "config": config,
                       "template": words, "task": task, "train": train_fp, "items": texts_fp},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_root() -> str:
    from puma_ray.models.tiny import default_root as models_root
    return models_root()


def foundation_folder(family: str, seed: int, cfg: FoundationConfig, train: pd.DataFrame, items: pd.DataFrame,
                      template: TemplateConfig, task: str, data_name: str, root: str | None = None) -> str:
    """Where the foundation these inputs determine is (or would be) cached; complete when its card is there."""
    key = cache_key(family, seed, cfg, template, task, train_fingerprint(train), train_item_texts(train, items))
    name = f"foundation-{family}-d{cfg.hidden_size}-L{cfg.layers}-seed{seed}-{data_name}-{key[:12]}"
    return os.path.join(root or default_root(), name)


def cached_model(model: ModelConfig, ds, template: TemplateConfig | None) -> str | None:
    """The folder a model config loads from without pretraining anything: a foundation's cached folder (None
    when it is not cached yet), any other name as it is."""
    if not is_foundation(model.name):
        return model.name
    folder = foundation_folder(model.name[len(PREFIX):], model.seed, model.foundation or FoundationConfig(),
                               ds.split("train"), ds.items, task_template(template, ds.task), ds.task, ds.name)
    return folder if os.path.exists(os.path.join(folder, CARD)) else None


def ensure_foundation(family: str, seed: int, cfg: FoundationConfig, train: pd.DataFrame, items: pd.DataFrame,
                      template: TemplateConfig, task: str, data_name: str, root: str | None = None,
                      log=print) -> str:
    """Folder of the foundation these inputs determine, pretrained first when it is not cached."""
    texts, train_fp = train_item_texts(train, items), train_fingerprint(train)
    key = cache_key(family, seed, cfg, template, task, train_fp, texts)
    folder = foundation_folder(family, seed, cfg, train, items, template, task, data_name, root)
    if os.path.exists(os.path.join(folder, CARD)):
        return folder
    log(f"foundation {family} (d={cfg.hidden_size}, {cfg.layers} layers, seed {seed}) not cached: pretraining on "
        f"{len(train):,} train records of {data_name}")
    model, tokenizer, stats = pretrain(family, cfg, seed, train, texts, template, task, PREFIX, log)
    tmp = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover of a killed run (pid-named): nobody else's
    os.makedirs(tmp)
    quiet_library_progress()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    card = {"format": FORMAT, "family": family, "model_type": model.config.model_type,
            "hidden_size": cfg.hidden_size, "layers": cfg.layers, "seed": seed,
            "num_params": sum(p.numel() for p in model.parameters()), "fingerprint": weight_fingerprint(model),
            "data": {"name": data_name, "split": "train", "records": int(len(train)), "records_sha256": train_fp,
                     "items": len(texts)},
            "recipe": {"kind": "throwaway per-user vectors in the task template, all weights trained",
                       "config": to_dict(cfg), "template": to_dict(template), "task": task},
            **stats, "cache_key": key}
    # last: a folder without a card is incomplete
    write_file(fsspec.filesystem("file"), os.path.join(tmp, CARD), json.dumps(card, indent=1).encode())
    try:
        os.replace(tmp, folder)  # atomic: concurrent processes never see half a model
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race with identical weights
    log(f"foundation {family}: pretrained in {stats['wall_s']:.1f}s, fingerprint {card['fingerprint'][:12]} → {folder}")
    return folder


def read_card(folder: str) -> dict | None:
    path = os.path.join(folder, CARD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def resolve_model(model: ModelConfig, ds, template: TemplateConfig | None, log=print) -> ModelConfig:
    """foundation:<family> → the same config naming its (pretrained, cached) local folder; others unchanged."""
    if not is_foundation(model.name):
        return model
    family = model.name[len(PREFIX):]
    folder = ensure_foundation(family, model.seed, model.foundation or FoundationConfig(), ds.split("train"),
                               ds.items, task_template(template, ds.task), ds.task, ds.name, log=log)
    return dataclasses.replace(model, name=folder, foundation=None)
