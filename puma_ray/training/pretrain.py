"""Pretraining a small foundation model on one dataset's train split, in the "1+N" shape (recipes/foundation.py
caches and names the result): the task template with a throwaway learned vector per user in the user slot, all of
the model's weights trained with them through a throwaway head, on the same epoch loop as every other fit.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch

from puma_ray.config import FoundationConfig, TemplateConfig
from puma_ray.models.backbone import Backbone, embedding_rms
from puma_ray.models.heads import make_head, task_loss
from puma_ray.models.identity import ModelIdentity
from puma_ray.models.prompted_lm import PromptedLM, item_token
from puma_ray.training.cost import Cost
from puma_ray.training.loop import EpochSteps, lr_schedule, run_epochs
from puma_ray.training.records import RecordSet, forward_batch


def build_model(family: str, cfg: FoundationConfig, seed: int, texts: dict[str, str]):
    """A fresh `family` model at cfg's width/depth and its BPE tokenizer over the templates + `texts`."""
    from transformers import AutoModelForCausalLM

    from puma_ray.models.tiny import build_tokenizer, family_config
    tokenizer = build_tokenizer(list(texts.values()), cfg.vocab_size)
    if cfg.item_tokens:
        tokenizer.add_tokens([item_token(item) for item in sorted(texts)], special_tokens=True)
    torch.manual_seed(seed)
    config = family_config(family, cfg.hidden_size, cfg.layers, len(tokenizer), cfg.heads)
    if cfg.tie_embeddings is not None:
        config.tie_word_embeddings = cfg.tie_embeddings
    model = AutoModelForCausalLM.from_config(config)
    return model, tokenizer


def pretrain(family: str, cfg: FoundationConfig, seed: int, train: pd.DataFrame, texts: dict[str, str],
             template: TemplateConfig, task: str, name_prefix: str = "foundation:",
             log=print) -> tuple[torch.nn.Module, object, dict]:
    """Trains a fresh `family` model with throwaway per-user vectors on `train`; returns (model, tokenizer, stats)."""
    model, tokenizer = build_model(family, cfg, seed, texts)
    model.train()
    identity = ModelIdentity(name=f"{name_prefix}{family} (pretraining)", family=model.config.model_type,
                             hidden_size=cfg.hidden_size, fingerprint="pretraining",
                             num_params=sum(p.numel() for p in model.parameters()))
    plm = PromptedLM(Backbone(model, tokenizer, identity), template, cfg.prompt_length, texts, prefix_cache_mib=0)
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
    sched = lr_schedule(opt, "warmup_cosine", total_steps, int(cfg.warmup_frac * total_steps))

    drop = torch.Generator().manual_seed(seed)

    def prompts_for(idx: torch.Tensor) -> torch.Tensor:
        vectors = users_table(idx).view(-1, l, d) * scale  # `scale` read at call time: the latest step's
        if cfg.user_dropout and model.training:  # some records without their user: the item alone must predict
            keep = torch.rand(len(idx), 1, 1, generator=drop) >= cfg.user_dropout
            vectors = vectors * keep
        return vectors

    def step(batch: RecordSet) -> tuple[float, int]:
        nonlocal scale
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
        return loss.item(), tokens

    def train_mode(on: bool) -> None:
        model.train(on)
        head.train(on)

    cost = Cost(flops_per_token=6.0 * identity.num_params)  # weights trained: forward + 2x backward
    start = time.perf_counter()
    # no validation and no early stopping: the valid split is never read (the card says which records were)
    steps = EpochSteps(batches=lambda epoch: records.sample(cfg.max_train_records, rng).batches(cfg.batch_size, rng),
                       step=step, train_mode=train_mode)
    state = run_epochs(steps, task, cfg.epochs, patience=0, cost=cost, backward=False, log=log,
                       log_prefix=f"pretrain {family} ")
    model.eval()
    model.requires_grad_(False)
    stats = {"steps": total_steps, "final_epoch_loss": state.history[-1]["train_loss"] if state.history else None,
             "wall_s": round(time.perf_counter() - start, 2), "records_seen": cost.forward_records,
             "flops": float(cost.flops)}
    return model, tokenizer, stats
