"""Per-user statistics that selection strategies read, computed from the source model and store.

variance: sample variance (ddof=1) of the user's training labels (0 for a single record);
loss:     the source model's mean task loss over (up to `max_records` of) the user's training records;
ffn:      [BOS, p_u] fed through the source model; the MLP activations (the input of each layer's down
          projection) at the last position of the last three layers, binarised, concatenated, L2-normalised.
Loss and FFN cost forward passes through the source LLM; they are counted in the returned Cost.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from puma_ray.models.heads import record_losses
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.training.cost import Cost
from puma_ray.training.records import RecordSet, forward_batch


def label_variance(train: pd.DataFrame, users: np.ndarray) -> np.ndarray:
    # float64, as the Ray layer's streaming aggregation sums: float32 labels gave variances 2e-7 apart
    var = train["label"].astype(np.float64).groupby(train["user_id"]).var(ddof=1)
    return var.reindex(users).fillna(0.0).to_numpy(np.float64)


def loss_sample(train: pd.DataFrame, max_records: int, seed: int) -> pd.DataFrame:
    """At most `max_records` of each user's records, chosen by a seeded hash of (user, item): the same rows
    whichever process holds the user's records (this one, or a Ray actor holding a block of users)."""
    if not max_records:
        return train
    key = pd.util.hash_pandas_object(train[["user_id", "item_id"]].astype(str), index=False,
                                     hash_key=f"{seed % 10 ** 16:016d}").to_numpy()
    order = np.lexsort((key, train["user_id"].astype(str).to_numpy()))
    ranked = train.iloc[order]
    return ranked[ranked.groupby("user_id", sort=False).cumcount().to_numpy() < max_records]


def mean_loss_per_user(plm: PromptedLM, head, task: str, prompts_for, records: RecordSet, n_users: int,
                       batch_size: int, cost: Cost | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sum of per-record losses, record count) per prompt row of `records`."""
    total, count = np.zeros(n_users), np.zeros(n_users)
    for batch in records.batches(batch_size):
        logits, tokens = forward_batch(plm, prompts_for, batch)
        per_record, _ = record_losses(task, head, logits, torch.from_numpy(batch.labels).to(logits.device))
        np.add.at(total, batch.user_index, per_record.double().cpu().numpy())
        np.add.at(count, batch.user_index, 1)
        if cost is not None:
            cost.add_batch(batch, tokens, backward=False)
    return total, count


@torch.no_grad()
def source_loss(plm: PromptedLM, head, task: str, prompts: np.ndarray, train: pd.DataFrame, users: np.ndarray,
                max_records: int = 16, batch_size: int = 256, seed: int = 0) -> tuple[np.ndarray, Cost]:
    """Mean per-user loss of the source model + store; at most `max_records` per user (a sample: the statistic
    only has to rank users, and the full pass would cost as much as an epoch)."""
    records = RecordSet.from_frame(loss_sample(train, max_records, seed), users)
    table = torch.from_numpy(prompts)
    cost = Cost(flops_per_token=2.0 * (plm.backbone.identity.num_params or 0))
    start = time.perf_counter()
    total, count = mean_loss_per_user(plm, head, task, lambda idx: table[idx], records, len(users), batch_size, cost)
    cost.wall_s = time.perf_counter() - start
    return np.where(count > 0, total / np.maximum(count, 1), 0.0), cost


@torch.no_grad()
def ffn_features(plm: PromptedLM, prompts: np.ndarray, layers: int = 3,
                 batch_size: int = 512) -> tuple[np.ndarray, Cost]:
    model = plm.model
    decoder_layers = model.base_model.layers
    captured: list[torch.Tensor] = []

    def hook(_module, args):
        captured.append(args[0][:, -1].float())  # the MLP activation at the last position

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook) for layer in decoder_layers[-layers:]]
    cost = Cost(flops_per_token=2.0 * (plm.backbone.identity.num_params or 0))
    start = time.perf_counter()
    out = []
    try:
        emb_layer = model.get_input_embeddings()
        bos = plm.tok.bos_token_id if plm.tok.bos_token_id is not None else plm.pad_id
        for i in range(0, len(prompts), batch_size):
            p = torch.from_numpy(prompts[i:i + batch_size])
            ids = torch.full((len(p), 1), bos, dtype=torch.long, device=emb_layer.weight.device)
            emb = torch.cat([emb_layer(ids), p.to(emb_layer.weight.device, emb_layer.weight.dtype)], dim=1)
            captured.clear()
            model.base_model(inputs_embeds=emb, use_cache=False)
            feats = (torch.cat(captured, dim=-1) > 0).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
            cost.forward_records += len(p)
            cost.tokens_forward += int(emb.shape[0] * emb.shape[1])
    finally:
        for h in handles:
            h.remove()
    cost.wall_s = time.perf_counter() - start
    return np.concatenate(out), cost
