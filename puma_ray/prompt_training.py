"""Eq. 1: train every user's soft prompt on one frozen model (the source system, and full retraining).

Prompts are trained in units of the model's token-embedding RMS (so one learning rate fits every family, Gemma's
sqrt(d)-scaled embeddings included) and stored at the embedding scale, i.e. exactly what goes into
`inputs_embeds`. Each row only changes when its user is in the batch: SparseAdam on a sparse embedding table.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .config import PromptTrainConfig
from .heads import make_head, task_loss
from .metrics import PRIMARY
from .prompted_lm import PromptedLM
from .training import Cost, EarlyStopper, RecordSet, describe_epoch, epoch_record, evaluate, forward_batch


@dataclass
class PromptTrainResult:
    users: np.ndarray  # sorted user ids, the rows of `prompts`
    prompts: np.ndarray  # (n, l, d) float32 at the embedding scale
    head: torch.nn.Module
    history: list[dict]
    best_epoch: int
    cost: Cost
    valid: dict


def train_prompts(plm: PromptedLM, task: str, train: pd.DataFrame, valid: pd.DataFrame, users: np.ndarray,
                  cfg: PromptTrainConfig, head: torch.nn.Module | None = None, log=print) -> PromptTrainResult:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n, l, d = len(users), cfg.prompt_length, plm.d
    table = torch.nn.Embedding(1 if cfg.shared else n, l * d, sparse=True)
    with torch.no_grad():  # uniform with RMS init_scale (in embedding-RMS units), like the paper's uniform init
        table.weight.uniform_(-cfg.init_scale * 3 ** 0.5, cfg.init_scale * 3 ** 0.5)
    head = head if head is not None else make_head(task)
    opt_prompts = torch.optim.SparseAdam(table.parameters(), lr=cfg.lr)
    opt_head = torch.optim.Adam(head.parameters(), lr=cfg.head_lr)
    scale = plm.embed_rms

    def prompts_for(idx: torch.Tensor) -> torch.Tensor:
        if cfg.shared:  # every user reads row 0
            idx = torch.zeros_like(idx)
        return table(idx).view(-1, l, d) * scale

    train_set, valid_set = RecordSet.from_frame(train, users), RecordSet.from_frame(valid, users)
    cost = Cost(flops_per_token=2.0 * (plm.backbone.identity.num_params or 0))
    stopper = EarlyStopper(task, cfg.patience)
    metric = PRIMARY[task][0]
    history = []
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        head.train()
        epoch_set = train_set.sample(cfg.max_train_records, rng)
        losses = []
        for batch in epoch_set.batches(cfg.batch_size, rng):
            logits, tokens = forward_batch(plm, prompts_for, batch)
            loss, _ = task_loss(task, head, logits, torch.from_numpy(batch.labels))
            opt_prompts.zero_grad()
            opt_head.zero_grad()
            loss.backward()
            opt_prompts.step()
            opt_head.step()
            with torch.no_grad():  # keep the touched rows within +-clip embedding RMS
                rows = torch.zeros(1, dtype=torch.long) if cfg.shared else torch.from_numpy(np.unique(batch.user_index))
                table.weight[rows] = table.weight[rows].clamp(-cfg.clip, cfg.clip)
            cost.add_batch(batch, tokens, backward=True)
            losses.append(loss.item())
        head.eval()
        cost.wall_s += time.perf_counter() - start
        valid_metrics = evaluate(plm, head, task, prompts_for, valid_set, cfg.eval_batch_size, cost)
        history.append(epoch_record(epoch, losses, valid_metrics, start))
        log(describe_epoch(history[-1], metric))
        stop = stopper.update(epoch, valid_metrics[metric], lambda: {
            "table": table.weight.detach().clone(), "head": copy.deepcopy(head.state_dict())})
        if stop:
            log(f"early stop: no better valid {metric} for {cfg.patience} epochs (best epoch {stopper.best_epoch})")
            break
    with torch.no_grad():
        table.weight.copy_(stopper.state["table"])
    head.load_state_dict(stopper.state["head"])
    rows = table.weight.detach().expand(n, -1) if cfg.shared else table.weight.detach()
    prompts = (rows.reshape(n, l, d) * scale).numpy().astype(np.float32)
    return PromptTrainResult(users=users, prompts=prompts, head=head, history=history,
                             best_epoch=stopper.best_epoch, cost=cost, valid={metric: stopper.best})
