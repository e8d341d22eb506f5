"""Predictions and metrics over ALL of a record set, through a PromptedLM and a head (no gradients)."""
from __future__ import annotations

import time

import numpy as np
import torch

from puma_ray.metrics import task_metrics
from puma_ray.models.heads import clamp_predictions, task_loss
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.training.cost import Cost
from puma_ray.training.records import PromptFn, RecordSet, forward_batch


@torch.no_grad()
def predict(plm: PromptedLM, head, task: str, prompts_for: PromptFn, records: RecordSet, batch_size: int,
            cost: Cost | None = None) -> np.ndarray:
    out = []
    for batch in records.batches(batch_size):
        logits, tokens = forward_batch(plm, prompts_for, batch)
        _, pred = task_loss(task, head, logits, torch.from_numpy(batch.labels).to(logits.device))
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
