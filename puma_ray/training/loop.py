"""The one epoch loop every fit runs: Eq. 1 (prompt training), the adapter fit (in process and in each Ray Train
worker), and the foundation pretraining.

A fit says only what differs: its batches for an epoch, one optimizer step, how to validate and what to keep as
its best state (`EpochSteps`). The loop owns the rest, the same way for all of them: train/eval modes, the wall
and LLM-pass counters (`Cost`), one history entry per epoch, early stopping on the task's primary metric, the
per-epoch hook (a Ray worker checkpoints and reports there), and resuming from a saved `LoopState`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from puma_ray.tasks import get_task
from puma_ray.training.cost import Cost
from puma_ray.training.records import RecordSet


def epoch_record(epoch: int, losses: list[float], valid_metrics: dict | None, start: float, **extra) -> dict:
    """One history entry, the same for every fit (in-process, prompt training, Ray workers)."""
    return {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
            **{f"valid_{k}": v for k, v in (valid_metrics or {}).items() if k != "records"},
            "wall_s": round(time.perf_counter() - start, 2), **extra}


def describe_epoch(entry: dict, metric: str) -> str:
    workers = f", {entry['workers']} worker(s)" if "workers" in entry else ""
    valid = f"  valid {metric} {entry[f'valid_{metric}']:.4f}" if f"valid_{metric}" in entry else ""
    return f"epoch {entry['epoch']}: train loss {entry['train_loss']:.4f}{valid}  ({entry['wall_s']:.1f}s{workers})"


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int = 0):
    """Per-step learning-rate schedule. "cosine": the paper's decay to 0 over `total_steps`, no warm-up;
    "warmup_cosine": linear warm-up over `warmup_steps`, then cosine to 0 (the foundation pretraining);
    "constant": no change (Eq. 1's prompts)."""
    total_steps = max(1, total_steps)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if kind == "warmup_cosine":
        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            span = max(1, total_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, total_steps - warmup_steps) / span))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raise ValueError(f"unknown schedule {kind!r}")


@dataclass
class LoopState:
    """A fit's progress, JSON-able: the history and the early-stopping state (what a checkpoint holds besides
    tensors). `best_state` (the snapshot of the best epoch's tensors) is kept in memory only."""
    epoch: int = -1  # the last finished epoch
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    resumed_from: int | None = None
    best_state: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("best_state")
        return out

    @classmethod
    def from_json(cls, data: dict, best_state: dict | None = None) -> "LoopState":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "best_state"}
        return cls(**known, best_state=best_state or {})


@dataclass
class EpochSteps:
    """What one fit supplies to `run_epochs`."""
    batches: Callable[[int], Iterable[RecordSet]]  # the training batches of epoch e
    step: Callable[[RecordSet], tuple[float, int]]  # one optimizer step on a batch → (loss, LLM tokens)
    train_mode: Callable[[bool], None]  # modules to train (True) or eval (False) mode
    validate: Callable[[], dict] | None = None  # validation metrics; None: no validation, no early stopping
    snapshot: Callable[[], dict] | None = None  # the state to keep when validation improves


# a long epoch says how far it is this often (Eq. 1 epochs over all records take minutes on CPU)
PROGRESS_EVERY_S = 15.0


def run_epochs(steps: EpochSteps, task: str, epochs: int, patience: int, cost: Cost, backward: bool,
               log: Callable[[str], None] = print, state: LoopState | None = None,
               on_epoch: Callable[[int, LoopState], None] | None = None, log_prefix: str = "",
               entry_extra: dict | None = None, progress_every_s: float = PROGRESS_EVERY_S) -> LoopState:
    """Runs epochs state.epoch + 1 .. epochs - 1 and returns the state; `state.best_state` is the snapshot of the
    best validation epoch (empty without validation). backward: whether gradients flow back through the LLM
    (counted as LLM record passes). on_epoch(epoch, state) runs after each epoch's bookkeeping. An epoch longer
    than progress_every_s logs a progress line (records so far, records/s) that often."""
    state = state or LoopState()
    rules = get_task(task)
    for epoch in range(state.epoch + 1, epochs):
        start = last_line = time.perf_counter()
        steps.train_mode(True)
        losses, records = [], 0
        for batch in steps.batches(epoch):
            loss, tokens = steps.step(batch)
            cost.add_batch(batch, tokens, backward=backward)
            if len(batch):  # an empty step (a Ray worker keeping the collectives in line) has no loss
                losses.append(loss)
            records += len(batch)
            now = time.perf_counter()
            if now - last_line >= progress_every_s:
                last_line = now
                log(f"{log_prefix}epoch {epoch}: {records:,} records, {records / (now - start):,.0f} records/s, "
                    f"loss {sum(losses) / len(losses):.4f}")
        steps.train_mode(False)
        cost.wall_s += time.perf_counter() - start
        valid = steps.validate() if steps.validate is not None else None
        state.history.append(epoch_record(epoch, losses, valid, start, **(entry_extra or {})))
        state.epoch = epoch
        log(log_prefix + describe_epoch(state.history[-1], rules.primary))
        if valid is not None:
            score = valid[rules.primary]
            if state.best is None or rules.better(score, state.best):
                state.best, state.best_epoch, state.bad_epochs = score, epoch, 0
                if steps.snapshot is not None:
                    state.best_state = steps.snapshot()
            else:
                state.bad_epochs += 1
        if on_epoch is not None:
            on_epoch(epoch, state)
        if valid is not None and state.bad_epochs > patience:
            log(f"{log_prefix}early stop: no better valid {rules.primary} for {patience} epoch(s) "
                f"(best epoch {state.best_epoch})")
            break
    return state
