"""Loader for Amazon Reviews 2023 (McAuley lab), e.g. the Movies & TV category the paper uses.

File format (JSON lines, optionally gzip-compressed; local paths or any fsspec URL such as s3://):

- reviews, `<Category>.jsonl(.gz)`: one object per line with keys
  rating (float 1-5), title, text, images, asin, parent_asin, user_id, timestamp (int, Unix milliseconds),
  helpful_vote, verified_purchase.
- metadata, `meta_<Category>.jsonl(.gz)`: one object per line with keys
  main_category, title, average_rating, rating_number, features, description, price, images, videos, store,
  categories, details, parent_asin, bought_together.

Mapping to the records contract (records.py): user_id = user_id, item_id = parent_asin (the product, not the
variant: ratings of a DVD and a Blu-ray of one film pool together, as in the dataset's own benchmarks),
label = rating, timestamp = Unix *seconds* (milliseconds // 1000, so every loader in this package uses one unit).
Item text = the metadata title, or the parent_asin where the title is missing or empty.

Filters as the paper: a k-core with items >= 10 ratings and users >= 20, then each user's 85 latest ratings, then
the per-user chronological split.

Also home to the small line-reading helpers the other JSON-lines / TSV loaders share.
"""
from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterator

import fsspec
import numpy as np
import pandas as pd

from puma_ray.fs import is_remote

from .records import (
    MAX_TEXTLESS_SHARE,
    DataError,
    Dataset,
    check_textless,
    chronological_split,
    k_core,
    latest_per_user,
    normalise,
    one_rating_per_user_item,
    validate,
)

__all__ = ["load_amazon", "iter_lines", "iter_json_lines", "require", "Interner", "decode", "counts", "dataset_name"]


# ----------------------------------------------------------------------------------------------- shared helpers
def iter_lines(path: str, storage_options: dict | None = None) -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, line without its newline) of a text file, streamed (files can be GBs).

    compression="infer" makes `.gz`/`.bz2`/... transparent; blank lines are skipped (a trailing newline at the end
    of a dump is common and is not an error).
    """
    options = (storage_options or {}) if is_remote(path) else {}  # S3 options mean nothing to a local file
    lineno = 0
    try:
        with fsspec.open(path, "rt", compression="infer", encoding="utf-8-sig", **options) as f:  # -sig: a BOM
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield lineno, line
    except UnicodeDecodeError:
        raise DataError(f"{path}:{lineno + 1}: not UTF-8 text (a compressed file without its .gz/.bz2 suffix, or "
                        "another encoding?)") from None
    except EOFError:
        raise DataError(f"{path}: ends in the middle of its compressed stream (an interrupted download?)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; data.paths names files") from None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:  # gzip.BadGzipFile and friends: a .gz that is not gzip
        raise DataError(f"{path}: cannot read it ({e})") from None


def iter_json_lines(path: str, storage_options: dict | None = None) -> Iterator[tuple[int, dict]]:
    """Yields (line number, object) of a JSON-lines file; a line that is not a JSON object raises DataError."""
    for lineno, line in iter_lines(path, storage_options):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def require(obj: dict, key: str, path: str, lineno: int):
    """obj[key], or a DataError naming the file, line and key (a KeyError deep in a loader says nothing useful)."""
    try:
        return obj[key]
    except KeyError:
        raise DataError(f"{path}:{lineno}: missing key {key!r}") from None


class Interner:
    """Maps strings to dense int codes while streaming.

    Tens of millions of repeated user/item id strings held in Python lists cost GBs; one copy of each distinct id
    plus a compact int32 code column per record costs a fraction of that.
    """

    def __init__(self):
        self.codes: dict[str, int] = {}

    def __call__(self, s: str) -> int:
        code = self.codes.get(s)
        if code is None:
            code = self.codes[s] = len(self.codes)
        return code

    def strings(self) -> np.ndarray:
        """The distinct strings in code order (index = code)."""
        out = np.empty(len(self.codes), dtype=object)
        for s, c in self.codes.items():
            out[c] = s
        return out


def counts(records: pd.DataFrame) -> dict:
    """Sizes recorded in provenance at each filtering stage."""
    return {
        "records": int(len(records)),
        "users": int(records["user_id"].nunique()),
        "items": int(records["item_id"].nunique()),
    }


def dataset_name(prefix: str, path: str) -> str:
    """`amazon-Movies_and_TV` from `.../Movies_and_TV.jsonl.gz`: the file's stem, without any suffixes."""
    stem = os.path.basename(path.rstrip("/"))
    for suffix in (".gz", ".bz2", ".xz", ".zst", ".jsonl", ".json", ".tsv"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return f"{prefix}-{stem}" if stem else prefix


# ------------------------------------------------------------------------------------------------------ amazon
def _read_reviews(path: str, storage_options: dict | None) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The four needed columns of a reviews file with ids as int codes (see Interner), and the code -> id tables.

    Other fields (review text, images, ...) are never kept: they are most of a file's bytes.
    """
    users, items = Interner(), Interner()
    user_col, item_col = array("i"), array("i")
    label_col, ts_col = array("f"), array("q")
    for lineno, obj in iter_json_lines(path, storage_options):
        rating = require(obj, "rating", path, lineno)
        ts = require(obj, "timestamp", path, lineno)
        if not isinstance(rating, (int, float)) or isinstance(rating, bool) or not 1 <= rating <= 5:
            raise DataError(f"{path}:{lineno}: rating must be a number in 1..5, got {rating!r}")
        if not isinstance(ts, int) or isinstance(ts, bool):
            raise DataError(f"{path}:{lineno}: timestamp must be an integer (Unix ms), got {ts!r}")
        user_col.append(users(str(require(obj, "user_id", path, lineno))))
        item_col.append(items(str(require(obj, "parent_asin", path, lineno))))
        label_col.append(rating)
        ts_col.append(ts // 1000)  # ms -> s: one timestamp unit across loaders
    frame = pd.DataFrame(
        {
            "user_id": np.frombuffer(user_col, dtype=np.int32),
            "item_id": np.frombuffer(item_col, dtype=np.int32),
            "label": np.frombuffer(label_col, dtype=np.float32),
            "timestamp": np.frombuffer(ts_col, dtype=np.int64),
        }
    )
    return frame, users.strings(), items.strings()


def decode(records: pd.DataFrame, user_ids: np.ndarray, item_ids: np.ndarray) -> pd.DataFrame:
    """Int codes back to id strings; done after the k-core, when few rows are left, and before the latest-N cut,
    whose tie-break on item_id must follow the strings' order like the split's."""
    out = records.copy()
    out["user_id"] = user_ids[out["user_id"].to_numpy()]
    out["item_id"] = item_ids[out["item_id"].to_numpy()]
    return out


def _read_titles(path: str, wanted: set[str], storage_options: dict | None) -> dict[str, str]:
    """parent_asin -> title for the wanted items only (a metadata file holds every product of the category)."""
    titles: dict[str, str] = {}
    for lineno, obj in iter_json_lines(path, storage_options):
        if "user_id" in obj and "rating" in obj:  # a review line also has parent_asin and a (review) title
            raise DataError(f"{path}:{lineno}: a review (user_id, rating), not product metadata: are the reviews "
                            "and meta paths swapped?")
        pid = str(require(obj, "parent_asin", path, lineno))
        if pid in wanted:
            title = obj.get("title")
            titles[pid] = title.strip() if isinstance(title, str) else ""
    return titles


def item_texts(item_ids: np.ndarray, titles: dict[str, str]) -> pd.DataFrame:
    """The items table; an item without a usable title is named by its id (better a bare id than no row)."""
    return pd.DataFrame({"item_id": item_ids, "text": [titles.get(i) or i for i in item_ids]})


def load_amazon(
    reviews_path: str,
    meta_path: str,
    *,
    min_item_ratings: int = 10,
    min_user_ratings: int = 20,
    keep_latest: int = 85,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    max_textless_share: float = MAX_TEXTLESS_SHARE,
    storage_options: dict | None = None,
) -> Dataset:
    """Reads an Amazon Reviews 2023 category into the records contract with the paper's filters (task "rating")."""
    raw, user_ids, item_ids = _read_reviews(reviews_path, storage_options)
    before = counts(raw)
    # verbatim repeated reviews and re-ratings of a product (its variants pool under parent_asin): one rating per
    # (user, item), the latest, before the k-core counts them
    deduped = one_rating_per_user_item(raw)
    cored = decode(k_core(deduped, min_item_ratings, min_user_ratings), user_ids, item_ids)
    latest = latest_per_user(cored, keep_latest)
    if latest.empty:
        raise DataError(
            f"{reviews_path}: no user keeps >= {min_user_ratings} ratings of items with >= {min_item_ratings} "
            "ratings; nothing left to load"
        )
    kept_items = np.sort(latest["item_id"].unique())
    titles = _read_titles(meta_path, set(kept_items), storage_options)
    textless = check_textless(kept_items, sum(1 for i in kept_items if not titles.get(i)), meta_path,
                              max_textless_share, "title")
    records, items = normalise(latest, item_texts(kept_items, titles))
    records = chronological_split(records, valid_frac, test_frac)
    provenance = {
        "source": "Amazon Reviews 2023",
        "files": {"reviews": reviews_path, "meta": meta_path},
        "filters": {
            "min_item_ratings": min_item_ratings,
            "min_user_ratings": min_user_ratings,
            "keep_latest": keep_latest,
            "max_textless_share": max_textless_share,
            "valid_frac": valid_frac,
            "test_frac": test_frac,
        },
        "timestamp_unit": "s",
        "counts": {
            "raw": before,
            "after_dedup": counts(deduped),
            "after_k_core": counts(cored),
            "after_keep_latest": counts(latest),
            **textless,
        },
        "repeated_ratings": "one per (user, item): the latest (data/records.py one_rating_per_user_item)",
    }
    ds = Dataset(records, items, "rating", dataset_name("amazon", reviews_path), provenance)
    return validate(ds, reviews_path)
