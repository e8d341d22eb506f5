"""Eq. 1: train every user's soft prompt on one frozen model (the source system, and full retraining).

Prompts are trained in units of the model's token-embedding RMS (so one learning rate fits every family, Gemma's
sqrt(d)-scaled embeddings included) and stored at the embedding scale, i.e. exactly what goes into
`inputs_embeds`. Each row only changes when its user is in the batch: SparseAdam on a sparse embedding table.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from puma_ray.config import PromptTrainConfig
from puma_ray.models.heads import make_head, task_loss
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.tasks import get_task
from puma_ray.training.cost import Cost
from puma_ray.training.evaluate import evaluate
from puma_ray.training.loop import EpochSteps, LoopState, run_epochs
from puma_ray.training.records import RecordSet, forward_batch


@dataclass
class PromptTrainResult:
    users: np.ndarray  # sorted user ids, the rows of `prompts`
    prompts: np.ndarray  # (n, l, d) float32 at the embedding scale
    head: torch.nn.Module
    history: list[dict]
    best_epoch: int
    cost: Cost
    valid: dict
    # Pearson correlation of the trained prompt values with their random start: near 1, the store is mostly its
    # initial noise (what an adapter then maps is noise); the paper's small init keeps it low. None: not tracked
    init_correlation: float | None = None


def init_correlation(start: np.ndarray, trained: np.ndarray) -> float:
    """Correlation over every prompt value of the trained table with its initial one (both in the same units)."""
    a, b = np.asarray(start, np.float64).ravel(), np.asarray(trained, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def train_prompts(plm: PromptedLM, task: str, train: pd.DataFrame, valid: pd.DataFrame, users: np.ndarray,
                  cfg: PromptTrainConfig, head: torch.nn.Module | None = None, log=print,
                  init: np.ndarray | None = None, train_head: bool = True) -> PromptTrainResult:
    """Eq. 1 over `users` (their rows of `train`, early stop on `valid`). A warm start (repair and polish,
    recipes/repair.py): `init` holds the users' starting prompts at the embedding scale, (n, l, d); the start is
    validated first and counts as epoch -1, so the result is never worse on `valid` than where it started.
    train_head False: the head stays as given (it is shared with users this run does not train)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n, l, d = len(users), cfg.prompt_length, plm.d
    scale = plm.embed_rms
    table = torch.nn.Embedding(1 if cfg.shared else n, l * d, sparse=True)
    with torch.no_grad():  # uniform with RMS init_scale (in embedding-RMS units), like the paper's uniform init
        table.weight.uniform_(-cfg.init_scale * 3 ** 0.5, cfg.init_scale * 3 ** 0.5)
        if init is not None:
            if cfg.shared or init.shape != (n, l, d):
                raise ValueError(f"warm start: prompts of shape {(n, l, d)} (one per user), got {init.shape}")
            table.weight.copy_(torch.from_numpy(np.asarray(init, np.float32).reshape(n, l * d)) / scale)
    start = table.weight.detach().clone()
    head = head if head is not None else make_head(task)
    if not train_head:
        head.requires_grad_(False)
    opt_prompts = torch.optim.SparseAdam(table.parameters(), lr=cfg.lr)
    opt_head = torch.optim.Adam(head.parameters(), lr=cfg.head_lr) if train_head else None

    def prompts_for(idx: torch.Tensor) -> torch.Tensor:
        if cfg.shared:  # every user reads row 0
            idx = torch.zeros_like(idx)
        return table(idx).view(-1, l, d) * scale

    train_set, valid_set = RecordSet.from_frame(train, users), RecordSet.from_frame(valid, users)
    cost = Cost(flops_per_token=2.0 * (plm.backbone.identity.num_params or 0))

    def step(batch: RecordSet) -> tuple[float, int]:
        logits, tokens = forward_batch(plm, prompts_for, batch)
        loss, _ = task_loss(task, head, logits, torch.from_numpy(batch.labels))
        opt_prompts.zero_grad()
        if opt_head is not None:
            opt_head.zero_grad()
        loss.backward()
        opt_prompts.step()
        if opt_head is not None:
            opt_head.step()
        with torch.no_grad():  # keep the touched rows within +-clip embedding RMS
            rows = torch.zeros(1, dtype=torch.long) if cfg.shared else torch.from_numpy(np.unique(batch.user_index))
            table.weight[rows] = table.weight[rows].clamp(-cfg.clip, cfg.clip)
        return loss.item(), tokens

    steps = EpochSteps(
        # each epoch: a fresh sample of the records (all of them without a cap), in a fresh order
        batches=lambda epoch: train_set.sample(cfg.max_train_records, rng).batches(cfg.batch_size, rng),
        step=step, train_mode=head.train,
        validate=lambda: evaluate(plm, head, task, prompts_for, valid_set, cfg.eval_batch_size, cost),
        snapshot=lambda: {"table": table.weight.detach().clone(), "head": copy.deepcopy(head.state_dict())})
    state = None
    if init is not None:  # the warm start is a candidate too: epochs must beat it on valid to replace it
        head.eval()
        first = steps.validate()[get_task(task).primary]
        state = LoopState(best=first, best_epoch=-1, best_state=steps.snapshot())
        log(f"warm start: valid {get_task(task).primary} {first:.4f}")
    state = run_epochs(steps, task, cfg.epochs, cfg.patience, cost, backward=True, log=log, state=state)
    with torch.no_grad():
        table.weight.copy_(state.best_state["table"])
    head.load_state_dict(state.best_state["head"])
    rows = table.weight.detach().expand(n, -1) if cfg.shared else table.weight.detach()
    prompts = (rows.reshape(n, l, d) * scale).numpy().astype(np.float32)
    return PromptTrainResult(users=users, prompts=prompts, head=head, history=state.history,
                             best_epoch=state.best_epoch, cost=cost,
                             valid={get_task(task).primary: state.best},
                             init_correlation=init_correlation(start.numpy(), table.weight.detach().numpy()))
