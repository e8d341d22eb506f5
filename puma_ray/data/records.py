"""The records and items contract (DESIGN.md "The data") and the per-user chronological split.

records: user_id: string, item_id: string, label: float32, timestamp: int64, split: string
         (+ history: list<string> of item ids, for CTR)
items:   item_id: string, text: string

Every loader returns a `Dataset` whose frames already satisfy this contract; `validate` is the one place that
checks it, so a loader bug or a hand-made file fails with a message that names the column or the user.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from puma_ray.errors import DataError
from puma_ray.ids import check_ids

SPLITS = ("train", "valid", "test")
RECORD_COLUMNS = {"user_id": "string", "item_id": "string", "label": "float32", "timestamp": "int64"}


@dataclass
class Dataset:
    records: pd.DataFrame  # RECORD_COLUMNS + split (+ history)
    items: pd.DataFrame  # item_id, text
    task: str  # "rating" | "ctr"
    name: str
    # provenance that goes into every store/report built from this data (files, filters, seed, ...)
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.task not in ("rating", "ctr"):
            raise DataError(f"dataset {self.name}: task must be 'rating' or 'ctr', got {self.task!r}")

    def split(self, name: str) -> pd.DataFrame:
        return self.records[self.records["split"] == name]

    @property
    def users(self) -> np.ndarray:
        """Sorted unique user ids: the canonical user order of every store built from this dataset."""
        return np.sort(self.records["user_id"].unique())

    def summary(self) -> dict:
        r = self.records
        return {
            "name": self.name,
            "task": self.task,
            "users": int(r["user_id"].nunique()),
            "items": int(len(self.items)),
            "records": {s: int((r["split"] == s).sum()) for s in SPLITS},
        }


def chronological_split(records: pd.DataFrame, valid_frac: float = 0.1, test_frac: float = 0.1) -> pd.DataFrame:
    """Adds `split`: each user's records ordered by (timestamp, item_id), the oldest to train, then valid, then test.

    Each user with >= 3 records gets at least one valid and one test record, so every user is evaluated; ties in
    timestamp are broken by item_id so the split is deterministic.
    """
    if not 0 <= valid_frac < 1 or not 0 < test_frac < 1 or valid_frac + test_frac >= 1:
        raise DataError(f"split fractions valid={valid_frac} test={test_frac} must be in [0,1) and sum below 1")
    df = records.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
    n = df.groupby("user_id", sort=False)["item_id"].transform("size").to_numpy()
    rank = df.groupby("user_id", sort=False).cumcount().to_numpy()
    n_test = np.where(n >= 3, np.maximum(1, np.round(n * test_frac)), 0).astype(int)
    n_valid = np.where((n >= 3) & (valid_frac > 0), np.maximum(1, np.round(n * valid_frac)), 0).astype(int)
    split = np.full(len(df), "train", dtype=object)
    split[rank >= n - n_test - n_valid] = "valid"
    split[rank >= n - n_test] = "test"
    df["split"] = split
    return df


def latest_per_user(records: pd.DataFrame, keep: int) -> pd.DataFrame:
    """Each user's `keep` most recent records (the paper: Amazon 85, Yelp 75)."""
    df = records.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    rank_from_end = df.groupby("user_id", sort=False).cumcount(ascending=False)
    return df[rank_from_end < keep].reset_index(drop=True)


# an item without its own text is read as its id: a few are normal (Amazon: ~1% of products have no title), most
# mean the metadata file is of another category or another kind, and training would go on reading ids
MAX_TEXTLESS_SHARE = 0.2


def check_textless(item_ids, textless: int, path: str, max_share: float, what: str) -> dict:
    """Refuses a metadata file that leaves more than `max_share` of the rated items without text; returns the
    counts for the provenance."""
    share = textless / max(len(item_ids), 1)
    if share > max_share:
        raise DataError(f"{path}: {textless:,} of {len(item_ids):,} rated items ({share:.0%}) have no {what} in this "
                        f"file (a metadata file of another category or kind?); allowed: {max_share:.0%} "
                        "(data.options.max_textless_share)")
    return {"items_without_text": int(textless), "items_without_text_share": round(share, 4)}


def one_rating_per_user_item(records: pd.DataFrame) -> pd.DataFrame:
    """The rule for repeated ratings, the same in every rating loader: a user's latest rating of an item stands
    (a re-rating replaces the opinion; ties: the later line of the file), earlier ones are dropped. Verbatim
    repeated lines of a dump are a special case. Without it, one user's ratings of two variants of one product
    (pooled by parent id) could land in train and test of the same item."""
    df = records.sort_values("timestamp", kind="stable")
    return df[~df.duplicated(["user_id", "item_id"], keep="last")].sort_index().reset_index(drop=True)


def k_core(records: pd.DataFrame, min_item: int, min_user: int) -> pd.DataFrame:
    """Drops items with < min_item records and users with < min_user, repeated until both hold (a k-core).

    Each round removes rows or stops, so it always terminates."""
    df = records
    while True:
        item_n = df.groupby("item_id")["user_id"].transform("size")
        user_n = df.groupby("user_id")["item_id"].transform("size")
        keep = (item_n >= min_item) & (user_n >= min_user)
        if keep.all():
            break
        df = df[keep]
    return df.reset_index(drop=True)


def normalise(records: pd.DataFrame, items: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Casts to the contract's dtypes (ids as strings, label float32, timestamp int64)."""
    records = records.copy()
    for col, dtype in RECORD_COLUMNS.items():
        records[col] = records[col].astype(dtype if dtype != "string" else str)
    items = items[["item_id", "text"]].copy()
    items["item_id"] = items["item_id"].astype(str)
    items["text"] = items["text"].astype(str)
    return records, items


def validate(ds: Dataset, source: str = "") -> Dataset:
    """Checks the contract; raises one DataError naming what is wrong and where."""
    where = f"{ds.name}{' (' + source + ')' if source else ''}"
    r = ds.records
    missing = [c for c in (*RECORD_COLUMNS, "split") if c not in r.columns]
    if missing:
        raise DataError(f"{where}: records lack column(s) {missing}")
    if ds.task == "ctr" and "history" not in r.columns:
        raise DataError(f"{where}: a ctr dataset needs a 'history' column")
    for col in ("user_id", "item_id"):
        empty = r[col].isna() | r[col].isin(["", "None", "nan"])
        if empty.any():
            raise DataError(f"{where}: empty {col} in {int(empty.sum())} record(s)")
        check_ids(r[col].to_numpy(), col, f"{where} records", DataError)  # row = record index
    check_ids(ds.items["item_id"].to_numpy(), "item_id", f"{where} items", DataError)
    bad = r[~np.isfinite(r["label"].to_numpy(dtype=np.float64))]
    if len(bad):
        raise DataError(f"{where}: non-finite label for user {bad['user_id'].iloc[0]!r}")
    if ds.task == "rating":
        out = r[(r["label"] < 1) | (r["label"] > 5)]
        if len(out):
            raise DataError(f"{where}: rating {out['label'].iloc[0]} outside 1..5 for user {out['user_id'].iloc[0]!r}")
    else:
        out = r[~r["label"].isin([0.0, 1.0])]
        if len(out):
            raise DataError(f"{where}: ctr label {out['label'].iloc[0]} not 0/1 for user {out['user_id'].iloc[0]!r}")
    bad_split = set(r["split"].unique()) - set(SPLITS)
    if bad_split:
        raise DataError(f"{where}: unknown split value(s) {sorted(bad_split)}")
    unknown = set(r["item_id"].unique()) - set(ds.items["item_id"])
    if unknown:
        raise DataError(f"{where}: {len(unknown)} item id(s) without item text, e.g. {sorted(unknown)[0]!r}")
    if ds.items["item_id"].duplicated().any():
        dup = ds.items.loc[ds.items["item_id"].duplicated(), "item_id"].iloc[0]
        raise DataError(f"{where}: item id {dup!r} appears twice in items")
    no_train = set(r["user_id"].unique()) - set(r.loc[r["split"] == "train", "user_id"].unique())
    if no_train:
        raise DataError(f"{where}: user {sorted(no_train)[0]!r} has no training record")
    return ds
