"""Evaluation on a Ray Data actor pool: the driver never holds the model, the prompts or the records.

The records (a frame, or the job's Parquet files cut to one split) are hash-partitioned by user, so that every
block holds all records of its users; each actor loads the frozen model (its prefix cache built once per actor) and
the head, and gets its users' prompts from a `PromptSource`: a store (the source store: what users have today), or
an adapter with its source store(s) (PUMA, the linear map: the prompts are mapped in the actor, nothing is written).
Prompts are read through `StoreIndex` (the id columns, then only the shards a block needs). An actor returns one
block's partial metrics (metrics.partial_metrics); the driver merges them: RMSE/MAE from sums, uAUC as the mean of
the per-user AUCs the actors computed, the global AUC from every (score, label) pair, ranked by scikit-learn: all
exact, equal to the in-process `training.evaluate.evaluate` (tests/test_ray_evaluate.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray

from puma_ray import errors
from puma_ray.artifacts.store_index import sorted_positions
from puma_ray.config import ModelConfig, TemplateConfig
from puma_ray.errors import PumaError, StoreError
from puma_ray.fs import StorageOptions, pyarrow_filesystem
from puma_ray.metrics import merge_partial_metrics, partial_metrics

from .compat import actor_pool, actor_retries, read_parquet_columns, user_error
from .progress import BlockProgress

COLUMNS = ["user_id", "item_id", "label", "history"]


@dataclass(frozen=True)
class PromptSource:
    """Where an evaluation actor gets a user's prompt: `store` (path = a store, read as is) or `adapter` (path = an
    adapter folder, `sources` = its source stores in order; the actor maps their prompts)."""
    kind: str
    path: str
    sources: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in ("store", "adapter") or (self.kind == "adapter") != bool(self.sources):
            raise ValueError(f"prompt source {self!r}: a store, or an adapter with its source stores")


@dataclass(frozen=True)
class RecordFiles:
    """Records in Parquet files (local or s3://), cut to one split in the cluster: the driver never reads them."""
    paths: tuple[str, ...]
    split: str


class Evaluator:
    """mode "metrics": one block's partial metrics; "loss": each of its users' summed task loss over a seeded
    sample of at most `loss_records` records (selection.statistics.loss_sample: the in-process rows). Public: the
    gate's actors (ray_layer/gate.py) hold two of these, the old system and the new, and call `predictions`."""

    def __init__(self, source: PromptSource, model: ModelConfig, template: TemplateConfig | None,
                 item_texts: dict[str, str], task: str, batch_size: int, threads: int, gpu: bool,
                 storage: StorageOptions | None, mode: str = "metrics", loss_records: int = 16, seed: int = 0):
        self.mode, self.loss_records, self.seed = mode, loss_records, seed
        import torch

        from puma_ray.artifacts.adapter_io import check_sources, load_adapter
        from puma_ray.artifacts.store import PromptStore
        from puma_ray.artifacts.store_index import StoreIndex
        from puma_ray.models.backbone import load_backbone
        from puma_ray.models.heads import load_head
        from puma_ray.models.prompted_lm import PromptedLM
        torch.set_num_threads(threads)
        self.device = "cuda" if gpu else "cpu"
        backbone = load_backbone(model.name, model.revision, model.dtype, model.seed)
        if source.kind == "store":
            store = PromptStore.open(source.path, storage)
            store.check_model(backbone.identity)
            self.adapter, self.head = None, load_head(*store.read_head())
            stores = [store]
            template = template or TemplateConfig(**store.manifest.template)
        else:
            self.adapter, self.head, config = load_adapter(source.path, storage)
            if config["target"]["fingerprint"] != backbone.identity.fingerprint:
                raise errors.AdapterError(f"adapter {source.path} maps to {config['target']['name']}, not to "
                                          f"{backbone.identity.describe()}")
            stores = [PromptStore.open(p, storage) for p in source.sources]
            check_sources(config, [s.identity for s in stores])
            self.adapter.to(self.device)
            if template is None:
                raise ValueError("an adapter's evaluation needs the migration's template")
        if gpu:
            backbone.model.to(self.device)
        self.indexes = [StoreIndex(s) for s in stores]
        self.plm = PromptedLM(backbone, template, stores[0].manifest.prompt_length, item_texts,
                              model.prefix_cache_mib)
        self.head = self.head.eval().to(self.device)
        self.task, self.batch_size = task, batch_size

    def _prompts_of(self, users: np.ndarray) -> np.ndarray:
        from puma_ray.conversion.units import map_prompts
        missing = ~np.logical_and.reduce([index.has(users) for index in self.indexes])
        if missing.any():
            first = str(users[missing][0])
            raise StoreError(f"store {self.indexes[0].store.path}: user {first!r} of the records has no prompt"
                             + (" in every source store" if len(self.indexes) > 1 else ""))
        rows = [index.rows(users) for index in self.indexes]
        return rows[0] if self.adapter is None else map_prompts(self.adapter, rows, device=self.device)

    def __call__(self, block: pd.DataFrame) -> pd.DataFrame:
        try:
            if self.mode == "loss":
                return self._losses(block)
            part = self._evaluate(block)
        except PumaError as e:  # returned, not raised: Ray Data's wrappers drop the error's type on the way back
            if self.mode == "loss":
                return pd.DataFrame({"user_id": [""], "loss_sum": [0.0], "count": [0], "tokens": [0],
                                     "error": [type(e).__name__], "message": [str(e)]})
            part = {"error": type(e).__name__, "message": str(e)}
        return pd.DataFrame({"part": [json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                                  for k, v in part.items()})]})

    def _records(self, block: pd.DataFrame):
        """(the block's users sorted, prompts_for over them, the block with string ids and list histories)."""
        import torch
        block = block.assign(user_id=block["user_id"].astype(str), item_id=block["item_id"].astype(str))
        if "history" in block.columns:  # Arrow gives numpy arrays back: the template wants lists of ids
            block["history"] = [list(map(str, h)) for h in block["history"]]
        users = np.sort(block["user_id"].unique())
        prompts = torch.from_numpy(self._prompts_of(users))
        return users, lambda idx: prompts[idx], block

    def predictions(self, block: pd.DataFrame):
        """(the block's RecordSet, this system's prediction of every record): the rows in the block's order."""
        from puma_ray.training.evaluate import predict
        from puma_ray.training.records import RecordSet
        users, prompts_for, block = self._records(block)
        records = RecordSet.from_frame(block, users)
        return records, predict(self.plm, self.head, self.task, prompts_for, records, self.batch_size)

    def has(self, users: np.ndarray) -> np.ndarray:
        """Whether each user has a prompt in every store this system reads."""
        return np.logical_and.reduce([index.has(users) for index in self.indexes])

    def _evaluate(self, block: pd.DataFrame) -> dict:
        records, pred = self.predictions(block)
        return partial_metrics(self.task, records.user_ids, records.labels, pred)

    def _losses(self, block: pd.DataFrame) -> pd.DataFrame:
        import torch

        from puma_ray.selection.statistics import loss_sample, mean_loss_per_user
        from puma_ray.training.cost import Cost
        from puma_ray.training.records import RecordSet
        users, prompts_for, block = self._records(block)
        records = RecordSet.from_frame(loss_sample(block, self.loss_records, self.seed), users)
        cost = Cost()
        with torch.no_grad():
            total, count = mean_loss_per_user(self.plm, self.head, self.task, prompts_for, records, len(users),
                                              self.batch_size, cost)
        return pd.DataFrame({"user_id": users, "loss_sum": total, "count": count.astype(np.int64),
                             "tokens": np.r_[cost.tokens_forward, np.zeros(len(users) - 1, np.int64)],
                             "error": "", "message": ""})


def _one_split(split: str):
    def keep(block: pd.DataFrame) -> pd.DataFrame:
        return block[block["split"] == split].drop(columns="split")
    return keep


def parquet_columns(path: str, storage: StorageOptions | None = None) -> list[str]:
    """The column names of a Parquet file (its footer only)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    fs, inner = pyarrow_filesystem(path, storage)
    with (fs or pafs.LocalFileSystem()).open_input_file(inner) as f:
        return pq.read_schema(f).names


def records_dataset(records: pd.DataFrame | RecordFiles, storage: StorageOptions | None = None):
    """A Ray Dataset of the evaluation columns; from files, read and cut to the split by Ray tasks."""
    if isinstance(records, RecordFiles):
        fs, first = pyarrow_filesystem(records.paths[0], storage)
        paths = [pyarrow_filesystem(p, storage)[1] for p in records.paths]
        names = set(parquet_columns(records.paths[0], storage))
        columns = [c for c in COLUMNS if c in names] + ["split"]
        ds = read_parquet_columns(paths if len(paths) > 1 else first, fs, columns)
        return ds.map_batches(_one_split(records.split), batch_format="pandas", batch_size=None)
    if records.empty:
        raise PumaError("evaluation: no records")
    return ray.data.from_pandas(records[[c for c in COLUMNS if c in records.columns]].reset_index(drop=True))


def on_user_blocks(records, storage, actor_cls, kwargs: dict, *, actors: int, blocks_per_actor: int,
                   cpus_per_actor: float, gpus_per_actor: float):
    """The records as `actors x blocks_per_actor` blocks, every record of a user in one block (per-user sums and
    AUC need them together), mapped by an actor pool of `actor_cls(**kwargs)`: each pass over every user's
    records (evaluation, source loss, the gate) runs through here."""
    ds = records_dataset(records, storage).repartition(max(1, actors * blocks_per_actor), keys=["user_id"])
    return ds.map_batches(actor_cls, batch_size=None, batch_format="pandas", fn_constructor_kwargs=kwargs,
                          num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None, **actor_pool(actors),
                          **actor_retries())


def evaluate_on_ray(source: PromptSource, model: ModelConfig, records: pd.DataFrame | RecordFiles,
                    item_texts: dict[str, str], task: str, *, template: TemplateConfig | None = None,
                    actors: int = 2, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                    threads_per_actor: int = 1, batch_size: int = 256, blocks_per_actor: int = 4,
                    storage: StorageOptions | None = None, log=None) -> dict:
    """task_metrics of `source`'s prompts on `records` (one split) through `model`, computed by `actors` actors;
    `log`: a progress line (blocks, records, records/s) at most every 15 s."""
    blocks = max(1, actors * blocks_per_actor)
    parts = on_user_blocks(
        records, storage, Evaluator,
        {"source": source, "model": model, "template": template, "item_texts": item_texts, "task": task,
         "batch_size": batch_size, "threads": threads_per_actor, "gpu": gpus_per_actor > 0, "storage": storage},
        actors=actors, blocks_per_actor=blocks_per_actor, cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor)
    progress, decoded = BlockProgress(f"evaluation of {source.path}", blocks, log), []
    try:
        for row in parts.iter_rows():
            decoded.append(json.loads(row["part"]))
            progress.add(decoded[-1].get("records", 0))
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
    decoded = [p for p in decoded if p["records"]]
    if not decoded:
        raise PumaError(f"evaluation of {source.path}: no records")
    return merge_partial_metrics(task, decoded)


def source_loss_on_ray(store_path: str, model: ModelConfig, records: RecordFiles, item_texts: dict[str, str],
                       task: str, users: np.ndarray, *, template: TemplateConfig | None = None,
                       max_records: int = 16, seed: int = 0, actors: int = 2,
                       cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, threads_per_actor: int = 1,
                       batch_size: int = 256, blocks_per_actor: int = 4, storage: StorageOptions | None = None):
    """selection.statistics.source_loss on the cluster: (mean loss per user aligned with the sorted `users`, 0
    without records; records and tokens through the model). The driver gets one row per user, batch by batch."""
    rows = on_user_blocks(
        records, storage, Evaluator,
        {"source": PromptSource("store", store_path), "model": model, "template": template,
         "item_texts": item_texts, "task": task, "batch_size": batch_size, "threads": threads_per_actor,
         "gpu": gpus_per_actor > 0, "storage": storage, "mode": "loss", "loss_records": max_records, "seed": seed},
        actors=actors, blocks_per_actor=blocks_per_actor, cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor)
    total, count = np.zeros(len(users)), np.zeros(len(users))
    tokens = 0
    for batch in rows.iter_batches(batch_size=65_536, batch_format="numpy"):
        errors_seen = batch["error"].astype(str)
        if (errors_seen != "").any():
            k = int(np.flatnonzero(errors_seen != "")[0])
            raise getattr(errors, errors_seen[k], PumaError)(str(batch["message"][k]))
        ids = batch["user_id"].astype(str)
        pos = sorted_positions(users, ids)
        if (pos < 0).any():
            raise StoreError(f"user {str(ids[pos < 0][0])!r} has records but is not a selection user")
        total[pos] += batch["loss_sum"]
        count[pos] += batch["count"]
        tokens += int(batch["tokens"].sum())
    return np.where(count > 0, total / np.maximum(count, 1), 0.0), int(count.sum()), tokens


def evaluate_store_on_ray(store_path: str, model: ModelConfig, records, item_texts: dict[str, str], task: str,
                          **kwargs) -> dict:
    """A store's own prompts, head and template (the source store; a converted store) on `records`."""
    return evaluate_on_ray(PromptSource("store", store_path), model, records, item_texts, task, **kwargs)
