"""The per-user gate on a Ray Data actor pool: each actor holds both systems, the old (a source model + its store)
and the new (the target model + the converted store), and returns for its block of records one row per user of
training/gate.user_loss_stats sums (records, old and new loss sums, the paired difference's sum and sum of
squares). The driver only adds rows per user: it never holds a model, a prompt or a record.

The records are the job's Parquet files cut to one split (the validation records: never test) and
hash-partitioned by user, as the evaluation's are (ray_layer/evaluate.py). Users the new store lacks (the
conversion rejected them) are left out, as the in-process gate leaves them out.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from puma_ray import errors
from puma_ray.config import ModelConfig, TemplateConfig
from puma_ray.errors import PumaError
from puma_ray.fs import StorageOptions
from puma_ray.training.gate import STAT_COLUMNS, user_loss_stats

from .compat import user_error
from .evaluate import Evaluator, PromptSource, RecordFiles, on_user_blocks


class _GateActor:
    """Two evaluators over the same block: the old system's and the new system's prediction of every record."""

    def __init__(self, old: tuple[PromptSource, ModelConfig], new: tuple[PromptSource, ModelConfig],
                 template: TemplateConfig | None, item_texts: dict[str, str], task: str, batch_size: int,
                 threads: int, gpu: bool, storage: StorageOptions | None):
        common = {"template": template, "item_texts": item_texts, "task": task, "batch_size": batch_size,
                  "threads": threads, "gpu": gpu, "storage": storage}
        self.old, self.new = Evaluator(*old, **common), Evaluator(*new, **common)
        self.task = task

    def __call__(self, block: pd.DataFrame) -> pd.DataFrame:
        try:
            users = block["user_id"].astype(str).to_numpy()
            block = block[self.new.has(users)]  # users the conversion rejected: not gated
            if block.empty:
                return _rows(pd.DataFrame(columns=list(STAT_COLUMNS)))
            records, old_pred = self.old.predictions(block)
            _, new_pred = self.new.predictions(block)
            return _rows(user_loss_stats(records.user_ids, self.task, records.labels, old_pred, new_pred))
        except PumaError as e:  # returned, not raised: Ray Data's wrappers drop the error's type on the way back
            return _rows(pd.DataFrame(columns=list(STAT_COLUMNS)), type(e).__name__, str(e))


def _rows(sums: pd.DataFrame, error: str = "", message: str = "") -> pd.DataFrame:
    """One block's per-user sums as plain columns (+ an error row when the block failed)."""
    out = pd.DataFrame({"user_id": np.asarray(sums.index, dtype=str),
                        **{c: sums[c].to_numpy(np.float64) for c in STAT_COLUMNS}})
    out["error"], out["message"] = "", ""
    if error:
        out = pd.DataFrame({"user_id": [""], **{c: [0.0] for c in STAT_COLUMNS}, "error": [error],
                            "message": [message]})
    return out


def gate_sums_on_ray(old: tuple[PromptSource, ModelConfig], new: tuple[PromptSource, ModelConfig],
                     records: RecordFiles, item_texts: dict[str, str], task: str, *,
                     template: TemplateConfig | None = None, actors: int = 2, cpus_per_actor: float = 1.0,
                     gpus_per_actor: float = 0.0, threads_per_actor: int = 1, batch_size: int = 256,
                     blocks_per_actor: int = 4, storage: StorageOptions | None = None) -> pd.DataFrame:
    """training/gate.user_loss_stats of `old` against `new` over `records` (one split), indexed by user_id:
    what `gate_from_stats` reads, summed over the actors' blocks."""
    rows = on_user_blocks(
        records, storage, _GateActor,
        {"old": old, "new": new, "template": template, "item_texts": item_texts, "task": task,
         "batch_size": batch_size, "threads": threads_per_actor, "gpu": gpus_per_actor > 0, "storage": storage},
        actors=actors, blocks_per_actor=blocks_per_actor, cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor)
    parts = []
    try:
        for batch in rows.iter_batches(batch_size=65_536, batch_format="pandas"):
            bad = batch["error"].astype(str) != ""
            if bad.any():  # the actor's own one line, as the in-process path raises it
                first = batch[bad].iloc[0]
                raise getattr(errors, first["error"], PumaError)(str(first["message"]))
            parts.append(batch[["user_id", *STAT_COLUMNS]])
    except PumaError:
        raise
    except Exception as e:  # a bad store or record in an actor's constructor: the one line it raised
        cause = user_error(e, PumaError)
        if cause is not None:
            raise type(cause)(str(cause)) from e
        raise
    if not parts:
        raise PumaError("gate: no validation records of a converted user")
    summed = pd.concat(parts).groupby("user_id", sort=True)[list(STAT_COLUMNS)].sum()
    summed["records"] = summed["records"].astype(np.int64)
    return summed
