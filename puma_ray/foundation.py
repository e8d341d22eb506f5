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
import math
import os
import shutil
import time

import numpy as np
import pandas as pd
import torch

from .backbone import Backbone, embedding_rms, quiet_library_progress, weight_fingerprint
from .config import FoundationConfig, ModelConfig, TemplateConfig, to_dict
from .heads import make_head, task_loss
from .prompted_lm import PromptedLM
from .store import ModelIdentity
from .training import Cost, RecordSet, forward_batch

PREFIX = "foundation:"
CARD = "foundation_card.json"
FORMAT = "puma-foundation/2"  # in the cache key: a recipe change here must not reuse old folders
RECORD_COLUMNS = ["user_id", "item_id", "label", "timestamp"]


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
    blob = json.dumps({"format": FORMAT, "family": family, "seed": seed, "config": to_dict(cfg),
                       "template": to_dict(template), "task": task, "train": train_fp, "items": texts_fp},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_root() -> str:
    from .tiny_models import default_root as models_root
    return models_root()


def _build(family: str, cfg: FoundationConfig, seed: int, texts: dict[str, str]):
    from transformers import AutoModelForCausalLM

    from .tiny_models import build_tokenizer, family_config
    tokenizer = build_tokenizer(list(texts.values()), cfg.vocab_size)
    torch.manual_seed(seed)
    config = family_config(family, cfg.hidden_size, cfg.layers, len(tokenizer), cfg.heads)
    model = AutoModelForCausalLM.from_config(config)
    return model, tokenizer


def pretrain(family: str, cfg: FoundationConfig, seed: int, train: pd.DataFrame, texts: dict[str, str],
             template: TemplateConfig, task: str, log=print) -> tuple[torch.nn.Module, object, dict]:
    """Trains a fresh `family` model with throwaway per-user vectors on `train`; returns (model, tokenizer, stats)."""
    model, tokenizer = _build(family, cfg, seed, texts)
    model.train()
    identity = ModelIdentity(name=f"{PREFIX}{family} (pretraining)", family=model.config.model_type,
                             hidden_size=cfg.hidden_size, fingerprint="pretraining",
                             num_params=sum(p.numel() for p in model.parameters()))
    plm = PromptedLM(Backbone(model, tokenizer, identity), template, cfg.prompt_length, texts)
    users = np.sort(train["user_id"].unique())
    records = RecordSet.from_frame(train, users)
    rng = np.random.default_rng(seed)
    l, d = cfg.prompt_length, cfg.hidden_size
    users_table = torch.nn.Embedding(len(users), l * d, sparse=True)
    with torch.no_grad():  # unit RMS in embedding units, as Eq. 1 initialises real prompts
        users_table.weight.uniform_(-3 ** 0.5, 3 ** 0.5)
    # the user vectors live at the model's *current* token-embedding RMS, as Eq. 1 places prompts at the frozen
    # model's: so the model learns to read a preference vector at exactly the scale Eq. 1 will give it (with the
    # scale fixed at the start, the trained embeddings grew ~3.5x past it and Eq. 1's prompts were out of range)
    scale = embedding_rms(model)
    head = make_head(task)  # throwaway too: each store trains its own head
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in embeddings], "lr": cfg.lr,
               "weight_decay": cfg.weight_decay},
              {"params": list(model.get_input_embeddings().parameters()), "lr": cfg.embedding_lr or cfg.lr,
               "weight_decay": 0.0},  # rare item words must not decay toward 0 between their few updates
              {"params": head.parameters(), "lr": cfg.lr, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups)
    opt_users = torch.optim.SparseAdam(users_table.parameters(), lr=cfg.user_lr)
    per_epoch = min(len(records), cfg.max_train_records or len(records))
    total_steps = cfg.epochs * math.ceil(per_epoch / cfg.batch_size)
    warmup = int(cfg.warmup_frac * total_steps)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total_steps - warmup) / max(1, total_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

    def prompts_for(idx: torch.Tensor) -> torch.Tensor:
        return users_table(idx).view(-1, l, d) * scale  # `scale` read at call time: the latest step's

    cost = Cost(flops_per_token=6.0 * identity.num_params)  # weights trained: forward + 2x backward
    start, losses = time.perf_counter(), []
    for epoch in range(cfg.epochs):
        epoch_set = records.sample(cfg.max_train_records, rng)
        losses = []
        for batch in epoch_set.batches(cfg.batch_size, rng):
            logits, tokens = forward_batch(plm, prompts_for, batch)
            loss, _ = task_loss(task, head, logits, torch.from_numpy(batch.labels))
            opt.zero_grad()
            opt_users.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt_users.step()
            sched.step()
            scale = embedding_rms(model)  # no grad: a strided sample of the embedding table, microseconds
            cost.add_batch(batch, tokens, backward=False)
            losses.append(loss.item())
        log(f"pretrain {family} epoch {epoch}: train loss {np.mean(losses):.4f} ({time.perf_counter() - start:.1f}s)")
    model.eval()
    model.requires_grad_(False)
    stats = {"steps": total_steps, "final_epoch_loss": float(np.mean(losses)) if losses else None,
             "wall_s": round(time.perf_counter() - start, 2), "records_seen": cost.forward_records,
             "flops": float(cost.flops)}
    return model, tokenizer, stats


def ensure_foundation(family: str, seed: int, cfg: FoundationConfig, train: pd.DataFrame, items: pd.DataFrame,
                      template: TemplateConfig, task: str, data_name: str, root: str | None = None,
                      log=print) -> str:
    """Folder of the foundation these inputs determine, pretrained first when it is not cached."""
    texts = train_item_texts(train, items)
    train_fp = train_fingerprint(train)
    key = cache_key(family, seed, cfg, template, task, train_fp, texts)
    name = f"foundation-{family}-d{cfg.hidden_size}-L{cfg.layers}-seed{seed}-{data_name}-{key[:12]}"
    folder = os.path.join(root or default_root(), name)
    if os.path.exists(os.path.join(folder, CARD)):
        return folder
    log(f"foundation {family} (d={cfg.hidden_size}, {cfg.layers} layers, seed {seed}) not cached: pretraining on "
        f"{len(train):,} train records of {data_name}")
    model, tokenizer, stats = pretrain(family, cfg, seed, train, texts, template, task, log)
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
    with open(os.path.join(tmp, CARD), "w") as f:  # last: a folder without a card is incomplete
        json.dump(card, f, indent=1)
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
                               ds.items, template or TemplateConfig.for_task(ds.task), ds.task, ds.name, log=log)
    return dataclasses.replace(model, name=folder, foundation=None)
