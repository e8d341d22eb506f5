"""Loader for MIND, the Microsoft News Dataset (the paper's CTR setting).

File format (tab-separated, no header, optionally compressed; local paths or any fsspec URL such as s3://):

- `behaviors.tsv`: ImpressionID, UserID, Time ("11/11/2019 9:05:58 AM"), History (space-separated news ids the
  user clicked before, oldest first; may be empty), Impressions (space-separated candidates "N1234-1" clicked /
  "N5678-0" not clicked).
- `news.tsv`: NewsID, Category, SubCategory, Title, Abstract, URL, TitleEntities, AbstractEntities.

Mapping to the records contract (records.py): one record per impression candidate: user_id = UserID,
item_id = the candidate's news id, label = 1.0 clicked / 0.0 not, timestamp = Time as Unix seconds (the dump's
times carry no zone; read as UTC, which keeps the order), history = the user's last `max_history` clicked news ids
from that impression's History (a list of str). Items = every news article, item text = its title.

The candidates of one impression share a timestamp, so the per-user chronological split orders them by news id and
may put one impression's candidates on both sides of a split boundary; they all share the same history, which only
holds clicks from before the impression, so nothing from the future leaks either way.
"""
from __future__ import annotations

import os
from array import array
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from .amazon import Interner, counts, decode, iter_lines
from .records import MAX_TEXTLESS_SHARE, DataError, Dataset, check_textless, chronological_split, normalise, validate

__all__ = ["load_mind", "read_news", "parse_time"]

NEWS_FIELDS = 8
BEHAVIOR_FIELDS = 5


def read_news(path: str, storage_options: dict | None = None) -> pd.DataFrame:
    """news.tsv -> items (item_id, text = title, or the id where the title is empty)."""
    ids, texts = [], []
    for lineno, line in iter_lines(path, storage_options):
        # Split on tabs ourselves: titles and abstracts hold quotes that csv/pandas quoting would mangle.
        parts = line.split("\t")
        if len(parts) != NEWS_FIELDS:
            raise DataError(f"{path}:{lineno}: expected {NEWS_FIELDS} tab-separated fields, got {len(parts)}")
        news_id, title = parts[0].strip(), parts[3].strip()
        if not news_id:
            raise DataError(f"{path}:{lineno}: empty NewsID")
        ids.append(news_id)
        texts.append(title or news_id)
    items = pd.DataFrame({"item_id": ids, "text": texts})
    dup = items["item_id"].duplicated()
    if dup.any():
        raise DataError(f"{path}: news id {items.loc[dup, 'item_id'].iloc[0]!r} appears twice")
    return items


def parse_time(value: str, path: str, lineno: int) -> int:
    """"11/11/2019 9:05:58 AM" -> Unix seconds (UTC)."""
    try:
        dt = datetime.strptime(value.strip(), "%m/%d/%Y %I:%M:%S %p")
    except ValueError:
        raise DataError(f"{path}:{lineno}: time {value!r} is not 'M/D/YYYY h:mm:ss AM|PM'") from None
    return int(dt.replace(tzinfo=timezone.utc).timestamp())


def _check_news(news_id: str, known: set[str], path: str, lineno: int, what: str) -> str:
    if news_id not in known:
        raise DataError(f"{path}:{lineno}: {what} news id {news_id!r} is not in news.tsv")
    return news_id


def _parse_candidate(token: str, path: str, lineno: int) -> tuple[str, float]:
    """"N1234-1" -> ("N1234", 1.0)."""
    news_id, sep, flag = token.rpartition("-")
    if not sep or flag not in ("0", "1"):
        # The MIND test split ships candidates without "-0/-1": it cannot train or score anything here.
        raise DataError(f"{path}:{lineno}: impression candidate {token!r} lacks a -0/-1 click label")
    return news_id, float(flag)


def _read_behaviors(path: str, known: set[str], max_history: int, storage_options: dict | None):
    """Streams behaviors.tsv into int-coded columns; each impression's history list is built once and shared by
    all its candidates (MIND-large has ~37 candidates per impression)."""
    users, items = Interner(), Interner()
    user_col, item_col, impr_col = array("i"), array("i"), array("i")
    label_col, ts_col = array("f"), array("q")
    histories: list[list[str]] = []
    seen: dict[str, int] = {}  # impression id -> hash of its line
    repeated = 0
    for lineno, line in iter_lines(path, storage_options):
        parts = line.split("\t")
        if len(parts) != BEHAVIOR_FIELDS:
            raise DataError(f"{path}:{lineno}: expected {BEHAVIOR_FIELDS} tab-separated fields, got {len(parts)}")
        impression_id, user, time, history, impressions = parts
        # the rule for repeats (as every loader: a verbatim repeated line is dropped): an impression is one event;
        # one user shown one news in two impressions is two events and both stay (CTR counts exposures)
        if impression_id in seen:
            if seen[impression_id] != hash(line):
                raise DataError(f"{path}:{lineno}: impression id {impression_id!r} appears twice with different "
                                "content")
            repeated += 1
            continue
        seen[impression_id] = hash(line)
        if not user.strip():
            raise DataError(f"{path}:{lineno}: empty UserID")
        ts = parse_time(time, path, lineno)
        clicked = [_check_news(n, known, path, lineno, "history") for n in history.split()]
        # the last max_history clicks; a shorter history is kept whole (a negative start would count from the end)
        histories.append(clicked[max(0, len(clicked) - max_history):] if max_history else [])
        user_code = users(user.strip())
        candidates = impressions.split()
        if not candidates:
            raise DataError(f"{path}:{lineno}: impression has no candidates")
        for token in candidates:
            news_id, label = _parse_candidate(token, path, lineno)
            user_col.append(user_code)
            item_col.append(items(_check_news(news_id, known, path, lineno, "candidate")))
            impr_col.append(len(histories) - 1)
            label_col.append(label)
            ts_col.append(ts)
    frame = pd.DataFrame(
        {
            "user_id": np.frombuffer(user_col, dtype=np.int32),
            "item_id": np.frombuffer(item_col, dtype=np.int32),
            "label": np.frombuffer(label_col, dtype=np.float32),
            "timestamp": np.frombuffer(ts_col, dtype=np.int64),
        }
    )
    history_table = np.empty(len(histories), dtype=object)
    history_table[:] = histories
    frame["history"] = history_table[np.frombuffer(impr_col, dtype=np.int32)]
    return decode(frame, users.strings(), items.strings()), len(histories), repeated


def load_mind(
    behaviors_path: str,
    news_path: str,
    *,
    max_history: int = 10,
    max_textless_share: float = MAX_TEXTLESS_SHARE,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    storage_options: dict | None = None,
) -> Dataset:
    """Reads a MIND split (behaviors.tsv + news.tsv) into the records contract (task "ctr")."""
    if max_history < 0:
        raise DataError(f"max_history must be >= 0, got {max_history}")
    items = read_news(news_path, storage_options)
    raw, n_impressions, repeated = _read_behaviors(behaviors_path, set(items["item_id"]), max_history, storage_options)
    if raw.empty:
        raise DataError(f"{behaviors_path}: no impressions")
    shown = items["item_id"].isin(set(raw["item_id"]))  # the candidates: what is scored
    textless = check_textless(np.flatnonzero(shown), int((shown & (items["text"] == items["item_id"])).sum()),
                              news_path, max_textless_share, "title")
    records, items = normalise(raw, items)  # keeps the extra history column as it is
    records = chronological_split(records, valid_frac, test_frac)
    labels = records["label"].to_numpy()
    provenance = {
        "source": "MIND",
        "files": {"behaviors": behaviors_path, "news": news_path},
        "filters": {"max_history": max_history, "max_textless_share": max_textless_share, "valid_frac": valid_frac,
                    "test_frac": test_frac},
        "timestamp_unit": "s",
        "counts": {
            **counts(raw),
            "impressions": n_impressions,
            "repeated_impression_lines_dropped": repeated,
            **textless,
            "news": int(len(items)),
            "click_rate": float(labels.mean()),
        },
    }
    folder = os.path.basename(os.path.dirname(behaviors_path.rstrip("/")))
    ds = Dataset(records, items, "ctr", f"mind-{folder}" if folder else "mind", provenance)
    return validate(ds, behaviors_path)
