"""Evaluation of a prompt store on a Ray Data actor pool: the driver never holds the model, the prompts or the records.

The records (a frame, or the job's Parquet files filtered to one split) are hash-partitioned by user, so that every
block holds all records of its users; each actor loads the frozen model (its prefix cache built once per actor), the
store's head, and an index user → shard of the store (the id columns only), reads the shards its users need
(checked against the manifest, as every store read), predicts, and returns one block's partial metrics
(metrics.partial_metrics). The driver merges them: RMSE/MAE from sums, uAUC as the mean of the per-user AUCs the
actors computed, the global AUC from every (score, label) pair, ranked by scikit-learn: all exact, equal to the
in-process `training.evaluate.evaluate` (tests/test_ray_evaluate.py).
"""
from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pandas as pd
import ray

from puma_ray import errors
from puma_ray.config import ModelConfig, TemplateConfig
from puma_ray.errors import PumaError, StoreError
from puma_ray.fs import StorageOptions
from puma_ray.metrics import merge_partial_metrics, partial_metrics

from .compat import actor_pool, actor_retries, user_error

COLUMNS = ["user_id", "item_id", "label", "history"]
SHARDS_KEPT = 4  # shards an actor keeps read: its blocks' users mostly sit in a few of them


class _StoreEvaluator:
    def __init__(self, store_path: str, model: ModelConfig, item_texts: dict[str, str], task: str, batch_size: int,
                 threads: int, gpu: bool, storage: StorageOptions | None):
        import torch

        from puma_ray.artifacts.store import PromptStore
        from puma_ray.models.backbone import load_backbone
        from puma_ray.models.heads import load_head
        from puma_ray.models.prompted_lm import PromptedLM
        torch.set_num_threads(threads)
        self.store = PromptStore.open(store_path, storage)
        backbone = load_backbone(model.name, model.revision, model.dtype, model.seed)
        self.store.check_model(backbone.identity)
        if gpu:
            backbone.model.to("cuda")
        template = TemplateConfig(**self.store.manifest.template)
        self.plm = PromptedLM(backbone, template, self.store.manifest.prompt_length, item_texts,
                              model.prefix_cache_mib)
        self.head = load_head(*self.store.read_head()).eval()
        self.task, self.batch_size = task, batch_size
        self.where = {}  # user → index of its shard in the manifest
        for k, entry in enumerate(self.store.manifest.shards):
            for user in self.store.read_user_ids(entry):
                self.where[str(user)] = k
        self._shards: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def _prompts_of(self, users: np.ndarray) -> np.ndarray:
        missing = [u for u in users if u not in self.where]
        if missing:
            raise StoreError(f"store {self.store.path}: user {missing[0]!r} of the records has no prompt")
        out = np.empty((len(users), *self.store.prompt_shape), np.float32)
        for k in sorted({self.where[u] for u in users}):
            if k not in self._shards:
                ids, prompts = self.store.read_shard(self.store.manifest.shards[k])
                self._shards[k] = dict(zip(map(str, ids), prompts))
                if len(self._shards) > SHARDS_KEPT:
                    self._shards.popitem(last=False)
            self._shards.move_to_end(k)
            rows = self._shards[k]
            for i, u in enumerate(users):
                if self.where[u] == k:
                    out[i] = rows[u]
        return out

    def __call__(self, block: pd.DataFrame) -> pd.DataFrame:
        try:
            part = self._evaluate(block)
        except PumaError as e:  # returned, not raised: Ray Data's wrappers drop the error's type on the way back
            part = {"error": type(e).__name__, "message": str(e)}
        return pd.DataFrame({"part": [json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                                  for k, v in part.items()})]})

    def _evaluate(self, block: pd.DataFrame) -> dict:
        import torch

        from puma_ray.training.evaluate import predict
        from puma_ray.training.records import RecordSet
        block = block.assign(user_id=block["user_id"].astype(str), item_id=block["item_id"].astype(str))
        if "history" in block.columns:  # Arrow gives numpy arrays back: the template wants lists of ids
            block["history"] = [list(map(str, h)) for h in block["history"]]
        users = np.sort(block["user_id"].unique())
        prompts = torch.from_numpy(self._prompts_of(users))
        records = RecordSet.from_frame(block, users)
        pred = predict(self.plm, self.head, self.task, lambda idx: prompts[idx], records, self.batch_size)
        return partial_metrics(self.task, records.user_ids, records.labels, pred)


def evaluate_store_on_ray(store_path: str, model: ModelConfig, records: pd.DataFrame, item_texts: dict[str, str],
                          task: str, *, actors: int = 2, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                          threads_per_actor: int = 1, batch_size: int = 256, blocks_per_actor: int = 4,
                          storage: StorageOptions | None = None) -> dict:
    """task_metrics of the store's prompts on `records` (one split), computed by `actors` pool actors."""
    if records.empty:
        raise PumaError(f"evaluation of store {store_path}: no records")
    columns = [c for c in COLUMNS if c in records.columns]
    ds = ray.data.from_pandas(records[columns].reset_index(drop=True))
    # every record of a user in one block: per-user AUC needs them together
    ds = ds.repartition(max(1, actors * blocks_per_actor), keys=["user_id"])
    parts = ds.map_batches(
        _StoreEvaluator, batch_size=None, batch_format="pandas",
        fn_constructor_kwargs={"store_path": store_path, "model": model, "item_texts": item_texts, "task": task,
                               "batch_size": batch_size, "threads": threads_per_actor, "gpu": gpus_per_actor > 0,
                               "storage": storage},
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None, **actor_pool(actors), **actor_retries())
    try:
        decoded = [json.loads(row["part"]) for row in parts.iter_rows()]
    except Exception as e:  # a bad store or record in an actor: the one line the in-process path gives
        cause = user_error(e, PumaError)
        if cause is not None:
            raise type(cause)(str(cause)) from e
        raise
    for p in decoded:
        if "error" in p:  # the actor's own one line, as the in-process path raises it
            raise getattr(errors, p["error"], PumaError)(p["message"])
        if task == "ctr":
            p["scores"], p["labels"] = np.asarray(p["scores"], np.float32), np.asarray(p["labels"], np.int8)
    return merge_partial_metrics(task, decoded)
