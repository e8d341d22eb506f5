"""Eq. 2: fit a mapping (the adapter, the linear baseline, or fixed prompts) through the frozen target model.

The target LLM never trains; the mapping and the target's task head do (the head initialised from the source's).
Early stopping on the validation users' records keeps the best state. The fit works in any process: the Ray layer
runs the same epoch loop (training/loop.py), batches and parameter groups inside its Train workers.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from puma_ray.config import ConfigError
from puma_ray.models.heads import task_loss
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.tasks import get_task
from puma_ray.training.cost import Cost
from puma_ray.training.evaluate import evaluate
from puma_ray.training.loop import EpochSteps, lr_schedule, run_epochs
from puma_ray.training.records import RecordSet, forward_batch
from puma_ray.training.run_identity import RunIdentity

# FitConfig fields that do not make a fit another one: more epochs continue the same fit (a rerun with a larger
# fit.epochs resumes it), patience only says when to stop, the evaluation batch changes no number
_NOT_IDENTITY = ("epochs", "patience", "eval_batch_size")


@dataclass
class FitConfig:
    lr: float = 1e-3  # paper: 1e-4 for an 88M adapter on 4 GPUs; small adapters on CPU want a larger step
    head_lr: float = 1e-3  # the target head starts from the source's: a gentler step than the adapter's
    epochs: int = 4  # the paper's adapter epochs
    batch_size: int = 32  # the paper's per-GPU batch
    eval_batch_size: int = 256  # no backward: larger batches are free
    weight_decay: float = 0.0  # the paper states none; dropout regularises the MLP
    grad_clip: float = 1.0  # the paper's
    patience: int = 2  # epochs without validation gain before stopping
    schedule: Literal["cosine", "constant"] = "cosine"  # the paper's cosine decay, no warm-up; or "constant"
    seed: int = 0  # adapter init, dropout and record order: the same seed gives the same adapter

    def __post_init__(self):
        if self.lr <= 0 or self.head_lr < 0:
            raise ConfigError("fit.lr must be > 0 and fit.head_lr >= 0")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("fit.epochs and fit.batch_size must be >= 1")


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
    # where a resumable fit kept its checkpoints and whether it resumed ({"folder", "identity", "resumed_from":
    # the epoch it went on from, or None}); None for a fit that keeps none (this process's)
    checkpoints: dict | None = None

    def summary(self) -> dict:
        """The fit's entry in a report: its history, best epoch and, when it has them, its checkpoints."""
        out = {"history": self.history, "best_epoch": self.best_epoch}
        return {**out, "checkpoints": self.checkpoints} if self.checkpoints is not None else out


def mapped_prompts(mapping: nn.Module, inputs: list[np.ndarray]):
    """prompts_for(user_index) that runs the mapping on the users' source prompts."""
    tensors = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in inputs]
    return lambda idx: mapping(*[t[idx] for t in tensors])


def adapter_param_groups(mapping: nn.Module, head: nn.Module, cfg: FitConfig) -> list[dict]:
    """The optimizer groups of every mapping fit (here and in the Ray Train workers): the mapping at lr with
    weight decay, the head at head_lr without it (a fixed-prompts mapping has no parameters: the head only)."""
    groups = [{"params": list(head.parameters()), "lr": cfg.head_lr}]
    mapping_params = [p for p in mapping.parameters() if p.requires_grad]
    if mapping_params:
        groups.insert(0, {"params": mapping_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    return groups


def epoch_orders(n_records: int, seed: int):
    """The record order of each epoch, the same wherever the fit runs (here, or a Ray worker resuming at epoch
    e: it draws and drops the orders of epochs 0..e-1 first)."""
    rng = np.random.default_rng(seed)
    drawn = [0]  # epochs whose order has been drawn

    def order(epoch: int) -> np.ndarray:
        if epoch < drawn[0]:
            raise ValueError(f"epoch {epoch}'s order was already drawn (epochs run in order)")
        while drawn[0] < epoch:  # a resumed fit skips the orders of the epochs it does not run again
            rng.permutation(n_records)
            drawn[0] += 1
        drawn[0] += 1
        return rng.permutation(n_records)
    return order


def fit_identity(plm: PromptedLM, task: str, mapping: nn.Module, inputs: list[np.ndarray], users: np.ndarray,
                 train: pd.DataFrame, valid: pd.DataFrame, head: nn.Module, cfg: FitConfig,
                 engine: dict | None = None) -> str:
    """The short hash naming a fit's checkpoint folder: its settings (`engine`: the runner's, such as precision),
    the target model and template, the mapping and head as they start, the source prompts, users and records."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IDENTITY}
    ident = RunIdentity("adapter-fit").add("fit", settings).add("engine", engine or {}).add("task", task)
    ident.add("target", plm.backbone.identity.fingerprint).add("template", vars(plm.template)).add("l", plm.l)
    ident.add("item_texts", sorted((str(k), str(v)) for k, v in (plm.item_texts or {}).items()))
    ident.add_module("mapping", mapping).add_module("head", head).add_array("users", np.asarray(users, dtype=str))
    for i, x in enumerate(inputs):
        ident.add_array(f"inputs.{i}", np.asarray(x, dtype=np.float32))
    columns = ["user_id", "item_id", "label", "timestamp", "history"]
    return ident.add_frame("train", train, columns).add_frame("valid", valid, columns).hexdigest()


def fit_mapping(plm: PromptedLM, task: str, mapping: nn.Module, inputs: list[np.ndarray], users: np.ndarray,
                train: pd.DataFrame, valid: pd.DataFrame, head: nn.Module, cfg: FitConfig, log=print,
                name: str = "fit") -> FitResult:
    """inputs: per source, (n_users, l, d_s) aligned with `users`; train/valid: records of the fit's users."""
    torch.manual_seed(cfg.seed)
    train_set, valid_set = RecordSet.from_frame(train, users), RecordSet.from_frame(valid, users)
    groups = adapter_param_groups(mapping, head, cfg)
    optimizer = torch.optim.AdamW(groups)
    steps_total = cfg.epochs * math.ceil(len(train_set) / cfg.batch_size)
    schedule = lr_schedule(optimizer, cfg.schedule, steps_total)
    prompts_for = mapped_prompts(mapping, inputs)
    params = [p for g in groups for p in g["params"]]
    flops_per_vector = getattr(mapping, "flops_per_vector", lambda: 0.0)()
    cost = Cost(flops_per_token=2.0 * (plm.backbone.identity.num_params or 0))
    order = epoch_orders(len(train_set), cfg.seed)

    def step(batch: RecordSet) -> tuple[float, int]:
        logits, tokens = forward_batch(plm, prompts_for, batch)
        loss, _ = task_loss(task, head, logits, torch.from_numpy(batch.labels))
        optimizer.zero_grad()
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        schedule.step()
        cost.extra_flops += 3 * flops_per_vector * len(batch) * plm.l  # adapter forward + backward
        return loss.item(), tokens

    def train_mode(on: bool) -> None:
        mapping.train(on)
        head.train(on)

    steps = EpochSteps(
        batches=lambda epoch: train_set.batches(cfg.batch_size, order=order(epoch)), step=step,
        train_mode=train_mode,
        validate=lambda: evaluate(plm, head, task, prompts_for, valid_set, cfg.eval_batch_size, cost),
        snapshot=lambda: {"mapping": copy.deepcopy(mapping.state_dict()), "head": copy.deepcopy(head.state_dict())})
    state = run_epochs(steps, task, cfg.epochs, cfg.patience, cost, backward=True, log=log, log_prefix="  ")
    mapping.load_state_dict(state.best_state["mapping"])
    head.load_state_dict(state.best_state["head"])
    return FitResult(mapping, head, state.history, state.best_epoch, {get_task(task).primary: state.best}, cost)
