"""Reads of the records' Parquet files that never materialise the whole table: one user set, or some splits.

The Ray executor (recipes/migration/on_ray.py) reads its fit users' records this way, each Eq. 1 worker on Ray Train
its own users' (ray_layer/prompt_train.py), and the reference-rows task the train and test splits. pyarrow skips
row groups and rows by the filter; nothing becomes a Python object per record until the final frame.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from puma_ray.errors import DataError
from puma_ray.fs import StorageOptions, pyarrow_filesystem
from puma_ray.ids import check_id_column


def _checked(table, path: str):
    """The table after its id columns passed the id rules (before pandas, where bad UTF-8 is a traceback)."""
    for column in ("user_id", "item_id"):
        if column in table.column_names:
            check_id_column(table.column(column), column, f"records {path}", DataError)
    return table


def read_user_records(records_path: str, users: np.ndarray, splits: list[str],
                      storage: StorageOptions | None) -> pd.DataFrame:
    """The records of `users` in `splits`, read with a Parquet filter (row groups and rows of other users are
    skipped by pyarrow, never materialised as Python objects)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs
    fs, inner = pyarrow_filesystem(records_path, storage)
    dataset = pads.dataset(inner, filesystem=fs or pafs.LocalFileSystem(), format="parquet")
    columns = [c for c in ("user_id", "item_id", "label", "history", "split") if c in dataset.schema.names]
    table = dataset.to_table(columns=columns, filter=pc.field("user_id").isin(list(map(str, users)))
                             & pc.field("split").isin(splits))
    frame = _checked(table, records_path).to_pandas()
    if "history" in frame.columns:
        frame["history"] = [list(map(str, h)) for h in frame["history"]]
    return frame.astype({"user_id": str, "item_id": str})


def read_splits(records_path: str, splits: list[str], storage: StorageOptions | None) -> pd.DataFrame:
    """user_id, item_id, label, split of the records in `splits`."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    fs, inner = pyarrow_filesystem(records_path, storage)
    table = pq.read_table(inner, filesystem=fs or pafs.LocalFileSystem(),
                          columns=["user_id", "item_id", "label", "split"],
                          filters=[("split", "in", list(splits))])
    return _checked(table, records_path).to_pandas()
