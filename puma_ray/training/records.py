"""Records as arrays (`RecordSet`) and one batch through the prompted LM: what every fit and evaluation reads.

A fit supplies `prompts_for(user_index) -> (B, l, d)` (trained prompts, or an adapter applied to source
prompts); everything else (encoding, readout, loss, metrics, counting LLM passes) is the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch

from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.training.memory import return_freed_memory

PromptFn = Callable[[torch.Tensor], torch.Tensor]


# glibc keeps the freed activations of batches of varying lengths: +11 KB a record over 131k test records (1.7 GB)
# before this; trimming every 32 batches kept the peak at the working set, at the same speed (training/memory.py)
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

    def batches(self, batch_size: int, rng: np.random.Generator | None = None, order: np.ndarray | None = None):
        """In `order`, else a permutation drawn from `rng`, else as stored."""
        if order is None:
            order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        for i, start in enumerate(range(0, len(order), batch_size)):
            yield self.subset(order[start:start + batch_size])
            if i % TRIM_EVERY_BATCHES == TRIM_EVERY_BATCHES - 1:  # every loop over records goes through here
                return_freed_memory()


def forward_batch(plm: PromptedLM, prompts_for: PromptFn, batch: RecordSet) -> tuple[torch.Tensor, int]:
    enc = plm.encode(batch.item_ids, batch.histories)
    prompts = prompts_for(torch.from_numpy(batch.user_index))
    return plm.label_logits(prompts, enc), enc["tokens"]
