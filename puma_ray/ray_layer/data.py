"""Ray Data input: records read from local paths or s3:// and per-user statistics by streaming aggregation.

The per-user label variance that selection needs is a groupby over the records, computed by Ray Data tasks
block by block; the driver only receives one row per user (count, mean, variance), never the records.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import ray
from ray.data.aggregate import Count, Mean, Std

from puma_ray.fs import StorageOptions, pyarrow_filesystem

from .compat import read_parquet_columns


def read_records(path: str | list[str], storage: StorageOptions | None = None) -> ray.data.Dataset:
    paths = [path] if isinstance(path, str) else list(path)
    fs, first = pyarrow_filesystem(paths[0], storage)
    inner = [pyarrow_filesystem(p, storage)[1] for p in paths]
    return read_parquet_columns(inner if len(inner) > 1 else first, fs, ["user_id", "label", "split"])


def per_user_label_stats(records: ray.data.Dataset, split: str = "train") -> pd.DataFrame:
    """user_id, records, mean, variance (ddof=1; 0 for a single record) of one split, by streaming groupby."""
    stats = (records.filter(lambda row: row["split"] == split)
             .groupby("user_id")
             .aggregate(Count(alias_name="records"), Mean("label", alias_name="mean"),
                        Std("label", ddof=1, alias_name="std"))
             .to_pandas())
    stats["variance"] = np.square(stats.pop("std").astype(np.float64)).fillna(0.0)
    return stats.sort_values("user_id").reset_index(drop=True)


def make_variance_fn(records_path: str | None, storage: StorageOptions | None = None):
    """variance_fn(train_frame, users) for migration.run: from the records files when the data lives in Parquet
    (the frame is then not shipped anywhere), else from the in-memory frame through Ray Data."""

    def variance(train: pd.DataFrame, users: np.ndarray) -> np.ndarray:
        ds = (read_records(records_path, storage) if records_path
              else ray.data.from_pandas(train[["user_id", "label"]].assign(split="train")))
        stats = per_user_label_stats(ds).set_index("user_id")["variance"]
        return stats.reindex(users).fillna(0.0).to_numpy(np.float64)

    return variance
