"""Loader for the Yelp Open Dataset (the paper's Yelp setting).

File format (JSON lines, optionally compressed; local paths or any fsspec URL such as s3://):

- `yelp_academic_dataset_review.json`: one object per line with keys
  review_id, user_id, business_id, stars (int 1-5), useful, funny, cool, text, date ("2016-03-09 00:44:15").
- `yelp_academic_dataset_business.json`: one object per line with keys
  business_id, name, address, city, state, postal_code, latitude, longitude, stars (float, the business average),
  review_count, is_open, attributes, categories ("Doctors, Health & Medical" or null), hours.

Mapping to the records contract (records.py): user_id, item_id = business_id, label = the review's stars,
timestamp = the date as Unix seconds (the dump's dates carry no zone; read as UTC, which keeps the order).
Item text = name, average stars, review count and categories, e.g.
"Mike's Diner (4.5 stars, 120 reviews; Restaurants, Diners)".

Filters as the paper: users with >= 25 reviews, then each user's 75 latest, then the per-user chronological split.
"""
from __future__ import annotations

from array import array
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from .amazon import Interner, counts, decode, iter_json_lines, require
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

__all__ = ["load_yelp", "business_text"]


def parse_date(value, path: str, lineno: int) -> int:
    """"2016-03-09 00:44:15" -> Unix seconds (UTC); fromisoformat is C code, fast enough for 7M lines."""
    try:
        return int(datetime.fromisoformat(value).replace(tzinfo=timezone.utc).timestamp())
    except (TypeError, ValueError):
        raise DataError(f"{path}:{lineno}: date {value!r} is not 'YYYY-MM-DD HH:MM:SS'") from None


def _read_reviews(path: str, storage_options: dict | None) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The four needed columns with ids as int codes (the review file is ~5 GB, mostly text we never keep)."""
    users, items = Interner(), Interner()
    user_col, item_col = array("i"), array("i")
    label_col, ts_col = array("f"), array("q")
    for lineno, obj in iter_json_lines(path, storage_options):
        stars = require(obj, "stars", path, lineno)
        if not isinstance(stars, (int, float)) or isinstance(stars, bool) or not 1 <= stars <= 5:
            raise DataError(f"{path}:{lineno}: stars must be a number in 1..5, got {stars!r}")
        user_col.append(users(str(require(obj, "user_id", path, lineno))))
        item_col.append(items(str(require(obj, "business_id", path, lineno))))
        label_col.append(stars)
        ts_col.append(parse_date(require(obj, "date", path, lineno), path, lineno))
    frame = pd.DataFrame(
        {
            "user_id": np.frombuffer(user_col, dtype=np.int32),
            "item_id": np.frombuffer(item_col, dtype=np.int32),
            "label": np.frombuffer(label_col, dtype=np.float32),
            "timestamp": np.frombuffer(ts_col, dtype=np.int64),
        }
    )
    return frame, users.strings(), items.strings()


def business_text(obj: dict) -> str:
    """The item's text: "<name> (<stars> stars, <n> reviews; <categories>)", the fields the paper names.

    A missing name falls back to the business id so every item keeps a distinct, non-empty text.
    """
    name = obj.get("name")
    name = name if isinstance(name, str) and name.strip() else str(obj["business_id"])
    facts = []
    if isinstance(obj.get("stars"), (int, float)):
        facts.append(f"{float(obj['stars']):.1f} stars")
    if isinstance(obj.get("review_count"), int):
        n = obj["review_count"]
        facts.append(f"{n} review{'' if n == 1 else 's'}")
    text = name.strip()
    cats = obj.get("categories")
    cats = cats.strip() if isinstance(cats, str) else ""
    if facts or cats:
        text += f" ({', '.join(facts)}{'; ' if facts and cats else ''}{cats})"
    return text


def _read_businesses(path: str, wanted: set[str], storage_options: dict | None) -> dict[str, str]:
    """business_id -> item text, for the wanted businesses only."""
    texts: dict[str, str] = {}
    for lineno, obj in iter_json_lines(path, storage_options):
        if "review_id" in obj or "user_id" in obj:  # a review or tip line also has business_id
            raise DataError(f"{path}:{lineno}: a review or tip (review_id/user_id), not a business: are the review "
                            "and business paths swapped?")
        bid = str(require(obj, "business_id", path, lineno))
        if bid in wanted:
            texts[bid] = business_text(obj)
    return texts


def load_yelp(
    review_path: str,
    business_path: str,
    *,
    min_user_reviews: int = 25,
    keep_latest: int = 75,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    max_textless_share: float = MAX_TEXTLESS_SHARE,
    storage_options: dict | None = None,
) -> Dataset:
    """Reads the Yelp Open Dataset into the records contract with the paper's filters (task "rating")."""
    raw, user_ids, item_ids = _read_reviews(review_path, storage_options)
    deduped = one_rating_per_user_item(raw)  # repeated lines and re-reviews: one per (user, business), the latest
    # min_item=1: the paper filters users only; k_core with it is one pass of the user filter.
    active = decode(k_core(deduped, 1, min_user_reviews), user_ids, item_ids)
    latest = latest_per_user(active, keep_latest)
    if latest.empty:
        raise DataError(f"{review_path}: no user has >= {min_user_reviews} reviews; nothing left to load")
    kept_items = np.sort(latest["item_id"].unique())
    texts = _read_businesses(business_path, set(kept_items), storage_options)
    missing = [b for b in kept_items if b not in texts]
    if missing:
        # A review of a business the business file lacks means mismatched dumps: say so rather than invent text.
        raise DataError(
            f"{business_path}: {len(missing)} reviewed business id(s) not in the business file, e.g. {missing[0]!r}"
        )
    # a business without a name is read as its id (business_text): a file of another kind has no names at all
    textless = check_textless(kept_items, sum(1 for b in kept_items if texts[b].split(" (")[0] == b), business_path,
                              max_textless_share, "name")
    items = pd.DataFrame({"item_id": kept_items, "text": [texts[b] for b in kept_items]})
    records, items = normalise(latest, items)
    records = chronological_split(records, valid_frac, test_frac)
    provenance = {
        "source": "Yelp Open Dataset",
        "files": {"review": review_path, "business": business_path},
        "filters": {
            "min_user_reviews": min_user_reviews,
            "keep_latest": keep_latest,
            "max_textless_share": max_textless_share,
            "valid_frac": valid_frac,
            "test_frac": test_frac,
        },
        "timestamp_unit": "s",
        "counts": {"raw": counts(raw), "after_dedup": counts(deduped), "after_user_filter": counts(active),
                   "after_keep_latest": counts(latest), **textless},
        "repeated_ratings": "one per (user, item): the latest (data/records.py one_rating_per_user_item)",
    }
    ds = Dataset(records, items, "rating", "yelp", provenance)
    return validate(ds, review_path)
