"""Record batches, prediction/evaluation through a PromptedLM, and cost counters: shared by every fit.

A fit supplies `prompts_for(user_index) -> (B, l, d)` (trained prompts, or an adapter applied to source
prompts); everything else (encoding, readout, loss, metrics, counting LLM passes) is the same.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .heads import clamp_predictions, task_loss
from .memory import return_freed_memory
from .metrics import task_metrics
from .prompted_lm import PromptedLM

PromptFn = Callable[[torch.Tensor], torch.Tensor]


# glibc keeps the freed activations of batches of varying lengths: +11 KB a record over 131k test records (1.7 GB)
# before this; trimming every 32 batches kept the peak at the working set, at the same speed (puma_ray/memory.py)
TRIM_EVERY_BATCHES = 32


@dataclass
class RecordSet:
    """A records frame as arrays, users mapped to row indices of a prompt table."""
    user_ids: np.ndarray
    user_index: np.ndarray
    item_ids: np.ndarray
    labels: np.ndarray
    histories: np.ndarray | None

    @classmethod
    def from_frame(cls, df: pd.DataFrame, users: np.ndarray | pd.Index) -> "RecordSet":
        """users: prompt-table rows in order; pass a pd.Index when calling per batch (built once, not per call)."""
        index = users if isinstance(users, pd.Index) else pd.Index(users)
        pos = index.get_indexer(df["user_id"])
        if (pos < 0).any():
            raise ValueError(f"user {df['user_id'].to_numpy()[pos < 0][0]!r} has records but no prompt row")
        hist = df["history"].to_numpy() if "history" in df.columns else None
        return cls(df["user_id"].to_numpy(), pos.astype(np.int64), df["item_id"].to_numpy(),
                   df["label"].to_numpy(np.float32), hist)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "RecordSet":
        return RecordSet(self.user_ids[idx], self.user_index[idx], self.item_ids[idx], self.labels[idx],
                         None if self.histories is None else self.histories[idx])

    def sample(self, limit: int | None, rng: np.random.Generator) -> "RecordSet":
        """An epoch's records: all of them, or `limit` drawn without replacement when there are more."""
        if not limit or len(self) <= limit:
            return self
        return self.subset(rng.choice(len(self), limit, replace=False))

    def batches(self, batch_size: int, rng: np.random.Generator | None = None):
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        for i, start in enumerate(range(0, len(order), batch_size)):
            yield self.subset(order[start:start + batch_size])
            if i % TRIM_EVERY_BATCHES == TRIM_EVERY_BATCHES - 1:  # every loop over records goes through here
                return_freed_memory()


@dataclass
class Cost:
    """What a stage spent: wall time, records through the LLM (forward, backward), estimated FLOPs."""
    wall_s: float = 0.0
    forward_records: int = 0
    backward_records: int = 0
    tokens_forward: int = 0
    tokens_backward: int = 0
    flops_per_token: float = 0.0  # 2 x LLM parameters
    extra_flops: float = 0.0  # adapter / head work, small but counted

    def add_batch(self, batch: RecordSet, tokens: int, backward: bool) -> None:
        self.forward_records += len(batch)
        self.tokens_forward += tokens
        if backward:
            self.backward_records += len(batch)
            self.tokens_backward += tokens

    @property
    def llm_record_passes(self) -> int:
        return self.forward_records + self.backward_records

    @property
    def flops(self) -> float:
        # backward through a frozen LLM computes activation gradients only (no weight gradients): ~1x forward
        return self.flops_per_token * (self.tokens_forward + self.tokens_backward) + self.extra_flops

    def merge(self, other: "Cost") -> "Cost":
        return Cost(self.wall_s + other.wall_s, self.forward_records + other.forward_records,
                    self.backward_records + other.backward_records, self.tokens_forward + other.tokens_forward,
                    self.tokens_backward + other.tokens_backward, max(self.flops_per_token, other.flops_per_token),
                    self.extra_flops + other.extra_flops)

    def to_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 3), "llm_record_passes": self.llm_record_passes,
                "forward_records": self.forward_records, "backward_records": self.backward_records,
                "flops": float(self.flops)}


def forward_batch(plm: PromptedLM, prompts_for: PromptFn, batch: RecordSet) -> tuple[torch.Tensor, int]:
    enc = plm.encode(batch.item_ids, batch.histories)
    prompts = prompts_for(torch.from_numpy(batch.user_index))
    return plm.label_logits(prompts, enc), int(enc["attention_mask"].sum())


@torch.no_grad()
def predict(plm: PromptedLM, head, task: str, prompts_for: PromptFn, records: RecordSet, batch_size: int,
            cost: Cost | None = None) -> np.ndarray:
    out = []
    for batch in records.batches(batch_size):
        logits, tokens = forward_batch(plm, prompts_for, batch)
        _, pred = task_loss(task, head, logits, torch.from_numpy(batch.labels))
        out.append(pred.cpu().numpy())
        if cost is not None:
            cost.add_batch(batch, tokens, backward=False)
    pred = np.concatenate(out) if out else np.zeros(0, np.float32)
    return clamp_predictions(task, pred)


def evaluate(plm: PromptedLM, head, task: str, prompts_for: PromptFn, records: RecordSet, batch_size: int,
             cost: Cost | None = None) -> dict:
    start = time.perf_counter()
    pred = predict(plm, head, task, prompts_for, records, batch_size, cost)
    if cost is not None:
        cost.wall_s += time.perf_counter() - start
    return task_metrics(task, records.user_ids, records.labels, pred)


def epoch_record(epoch: int, losses: list[float], valid_metrics: dict, start: float, **extra) -> dict:
    """One history entry, the same for every fit (in-process, prompt training, Ray workers)."""
    return {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
            **{f"valid_{k}": v for k, v in valid_metrics.items() if k != "records"},
            "wall_s": round(time.perf_counter() - start, 2), **extra}


def describe_epoch(entry: dict, metric: str) -> str:
    workers = f", {entry['workers']} worker(s)" if "workers" in entry else ""
    return (f"epoch {entry['epoch']}: train loss {entry['train_loss']:.4f}  valid {metric} "
            f"{entry[f'valid_{metric}']:.4f}  ({entry['wall_s']:.1f}s{workers})")


@dataclass
class EarlyStopper:
    """Keeps the best validation score and a copy of the state that got it; stops after `patience` worse epochs."""
    task: str
    patience: int
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    state: dict = field(default_factory=dict)

    def update(self, epoch: int, score: float, snapshot: Callable[[], dict]) -> bool:
        """Records the epoch; returns True when training should stop."""
        from .metrics import better
        if self.best is None or better(self.task, score, self.best):
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            self.state = snapshot()
        else:
            self.bad_epochs += 1
        return self.bad_epochs > self.patience
