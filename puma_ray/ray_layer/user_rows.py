"""Per-user rows of the records, computed where the records lie: the driver of a migration over millions of users
receives one row per user (or the rows of a few users), never the records table.

    per_user_rows(records)         one Ray Data groupby: each user's record counts per split and train-label variance
    joined_users(indexes, policy)  the sorted users every source store holds (store indexes, no prompt read)
    user_records(records, users)   a Parquet filter on user_id, run in a Ray task (the fit users' records)
    reference_rows(records, task)  the LLM-free reference predictors, fitted and scored in a Ray task
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import ray

from puma_ray.artifacts.store import StoreError
from puma_ray.artifacts.store_index import StoreIndex, sorted_positions
from puma_ray.data.parquet_reads import read_splits, read_user_records
from puma_ray.fs import StorageOptions
from puma_ray.training.memory import return_freed_memory

from .data import read_records

SPLITS = ("train", "valid", "test")


def joined_users(indexes: list[StoreIndex], policy: str) -> tuple[np.ndarray, dict]:
    """Sorted users present in every source (policy "error": every source must hold every user)."""
    if len(indexes) == 1:  # one source: its sorted ids as they are (no concatenated copy to sort at 1M users)
        if len(indexes[0].users) == 0:
            raise StoreError("the source stores share no user")
        return indexes[0].users, {}
    all_users = np.unique(np.concatenate([ix.users for ix in indexes]))
    common, dropped = all_users, {}
    for ix in indexes:
        missing = ~ix.has(all_users)
        if missing.any():
            if policy == "error":
                raise StoreError(f"user {str(all_users[missing][0])!r} is missing from source store {ix.store.path} "
                                 f"({int(missing.sum())} user(s) in all)")
            dropped[ix.store.path] = int(missing.sum())
            common = common[ix.has(common)]
    if len(common) == 0:
        raise StoreError("the source stores share no user")
    return common, dropped


def _train_label_columns(block: pd.DataFrame) -> pd.DataFrame:
    train = block["split"] == "train"
    return pd.DataFrame({"user_id": block["user_id"].astype(str), "train_label": block["label"].astype(np.float64)
                         .where(train), **{split: (block["split"] == split).astype(np.int64) for split in SPLITS}})


@dataclasses.dataclass
class UserRows:
    """One row per user with records, as arrays (no Python object per user): sorted ids, records of each split,
    train-label variance (ddof=1; 0 for a single record)."""
    users: np.ndarray
    counts: dict[str, np.ndarray]
    variance: np.ndarray

    def variance_of(self, users: np.ndarray) -> np.ndarray:
        pos = sorted_positions(self.users, users)
        return np.where(pos >= 0, self.variance[pos], 0.0)


def per_user_rows(records_path: str, storage: StorageOptions | None) -> UserRows:
    """One Ray Data groupby over the records; the driver receives its rows batch by batch."""
    from ray.data.aggregate import Mean, Std, Sum
    grouped = (read_records(records_path, storage)
               .map_batches(_train_label_columns, batch_format="pandas", batch_size=None)
               .groupby("user_id")
               .aggregate(*(Sum(split, alias_name=split) for split in SPLITS),
                          Mean("train_label", alias_name="mean", ignore_nulls=True),
                          Std("train_label", ddof=1, alias_name="std", ignore_nulls=True)))
    parts = {key: [] for key in ("user_id", "std", *SPLITS)}
    for batch in grouped.iter_batches(batch_size=65_536, batch_format="pyarrow"):
        parts["user_id"].append(batch.column("user_id").to_numpy(zero_copy_only=False).astype(str))
        parts["std"].append(batch.column("std").to_numpy(zero_copy_only=False).astype(np.float64))
        for key in SPLITS:
            parts[key].append(batch.column(key).to_numpy(zero_copy_only=False).astype(np.int64))
    ids = np.concatenate(parts.pop("user_id")) if parts["std"] else np.array([], dtype=str)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    columns = {key: (np.concatenate(v) if v else np.zeros(0))[order] for key, v in parts.items()}
    del parts, order
    return_freed_memory()  # the batches' temporary Python strings: glibc would keep their heap
    std = np.nan_to_num(columns.pop("std"), nan=0.0)  # null: one train record (or none)
    return UserRows(ids, columns, np.square(std))


@ray.remote
def _user_records_task(records_path: str, users: np.ndarray, splits: list[str], storage) -> pd.DataFrame:
    return read_user_records(records_path, users, splits, storage)


def user_records(records_path: str, users: np.ndarray, splits: list[str],
                 storage: StorageOptions | None) -> pd.DataFrame:
    """`users`' records of `splits`, read in a Ray task: the filtered scan decompresses whole row groups (~60 MB a
    million records), never in the driver."""
    return ray.get(_user_records_task.remote(records_path, users, splits, storage))


@ray.remote
def _reference_rows_task(records_path: str, storage: StorageOptions | None, task: str) -> dict:
    from puma_ray.training.reference import reference_metrics
    frame = read_splits(records_path, ["train", "test"], storage)
    return reference_metrics(task, frame[frame["split"] == "train"], frame[frame["split"] == "test"])


def reference_rows(records_path: str, storage: StorageOptions | None, task: str) -> dict:
    """training.reference's rows (fitted on the train split, on the test split) computed in a Ray task."""
    return ray.get(_reference_rows_task.remote(records_path, storage, task))
