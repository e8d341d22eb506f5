"""Eq. 2: fit a mapping (the adapter, the linear baseline, or fixed prompts) through the frozen target model.

The target LLM never trains; the mapping and the target's task head do (the head initialised from the source's).
Early stopping on the validation users' records keeps the best state. The fit works in any process: the Ray layer
runs this same epoch loop inside Train workers.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from .config import ConfigError
from .heads import task_loss
from .metrics import PRIMARY
from .prompted_lm import PromptedLM
from .training import Cost, EarlyStopper, RecordSet, describe_epoch, epoch_record, evaluate, forward_batch


@dataclass
class FitConfig:
    lr: float = 1e-3  # paper: 1e-4 for an 88M adapter on 4 GPUs; small adapters on CPU want a larger step
    head_lr: float = 1e-3
    epochs: int = 4  # the paper's adapter epochs
    batch_size: int = 32  # the paper's per-GPU batch
    eval_batch_size: int = 256
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # the paper's
    patience: int = 2  # epochs without validation gain before stopping
    schedule: str = "cosine"  # the paper's cosine decay, no warm-up; or "constant"
    seed: int = 0

    def __post_init__(self):
        if self.lr <= 0 or self.head_lr < 0:
            raise ConfigError("fit.lr must be > 0 and fit.head_lr >= 0")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("fit.epochs and fit.batch_size must be >= 1")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"fit.schedule must be 'cosine' or 'constant', got {self.schedule!r}")


class FixedPrompts(nn.Module):
    """The random-initialisation baseline: prompts given, nothing to learn but the head."""

    def forward(self, prompts: torch.Tensor) -> torch.Tensor:
        return prompts


@dataclass
class FitResult:
    mapping: nn.Module
    head: nn.Module
    history: list[dict]
    best_epoch: int
    valid: dict
    cost: Cost


def mapped_prompts(mapping: nn.Module, inputs: list[np.ndarray]):
    """prompts_for(user_index) that runs the mapping on the users' source prompts."""
    tensors = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in inputs]
    return lambda idx: mapping(*[t[idx] for t in tensors])


def fit_mapping(plm: PromptedLM, task: str, mapping: nn.Module, inputs: list[np.ndarray], users: np.ndarray,
                train: pd.DataFrame, valid: pd.DataFrame, head: nn.Module, cfg: FitConfig, log=print,
                on_epoch=None, name: str = "fit") -> FitResult:
    """inputs: per source, (n_users, l, d_s) aligned with `users`; train/valid: records of the fit's users.

    on_epoch(epoch, state) is called after each epoch (checkpointing hook for the Ray layer)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train_set, valid_set = RecordSet.from_frame(train, users), RecordSet.from_frame(valid, users)
    groups = [{"params": list(head.parameters()), "lr": cfg.head_lr}]
    mapping_params = [p for p in mapping.parameters() if p.requires_grad]
    if mapping_params:
        groups.insert(0, {"params": mapping_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    optimizer = torch.optim.AdamW(groups)
    steps = cfg.epochs * math.ceil(len(train_set) / cfg.batch_size)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
                if cfg.schedule == "cosine" else None)
    prompts_for = mapped_prompts(mapping, inputs)
    params = [p for g in groups for p in g["params"]]
    flops_per_vector = getattr(mapping, "flops_per_vector", lambda: 0.0)()
    cost = Cost(flops_per_token=2.0 * (plm.backbone.identity.num_params or 0))
    stopper = EarlyStopper(task, cfg.patience)
    metric = PRIMARY[task][0]
    history = []
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        mapping.train()
        head.train()
        losses = []
        for batch in train_set.batches(cfg.batch_size, rng):
            logits, tokens = forward_batch(plm, prompts_for, batch)
            loss, _ = task_loss(task, head, logits, torch.from_numpy(batch.labels))
            optimizer.zero_grad()
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            if schedule is not None:
                schedule.step()
            cost.add_batch(batch, tokens, backward=True)
            cost.extra_flops += 3 * flops_per_vector * len(batch) * plm.l  # adapter forward + backward
            losses.append(loss.item())
        mapping.eval()
        head.eval()
        cost.wall_s += time.perf_counter() - start
        valid_metrics = evaluate(plm, head, task, prompts_for, valid_set, cfg.eval_batch_size, cost)
        history.append(epoch_record(epoch, losses, valid_metrics, start))
        log("  " + describe_epoch(history[-1], metric))
        stop = stopper.update(epoch, valid_metrics[metric], lambda: {
            "mapping": copy.deepcopy(mapping.state_dict()), "head": copy.deepcopy(head.state_dict())})
        if on_epoch is not None:
            on_epoch(epoch, {"mapping": mapping, "head": head, "optimizer": optimizer, "history": history})
        if stop:
            break
    mapping.load_state_dict(stopper.state["mapping"])
    head.load_state_dict(stopper.state["head"])
    return FitResult(mapping, head, history, stopper.best_epoch, {metric: stopper.best}, cost)
