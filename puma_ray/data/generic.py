"""The generic records format (docs/bring-your-own.md "Logs"): a user's own interaction logs and item texts, in
Parquet, CSV or JSON Lines, local or s3://.

records: user_id, item_id, label, timestamp [, history] [, split]
items:   item_id, text

Without a `split` column each user's records are split here by the one chronological rule (records.py
`chronological_split`, the job's valid_frac/test_frac); with one, its values (train/valid/test) are used as given.
In CSV, `history` is a JSON list of item ids in one cell (CSV has no list type).
"""
from __future__ import annotations

import io
import json

import pandas as pd
import pyarrow as pa

from puma_ray.errors import DataError
from puma_ray.fs import StorageOptions, filesystem
from puma_ray.ids import check_id_column

from .records import Dataset, chronological_split, normalise, validate

# the file kinds this loader reads, by name ending; anything else is refused naming the file
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
# a logs file larger than this is refused before it is read: the driver reads it whole (a cluster reads records
# as Parquet shards in ray_layer/data.py); 4 GiB keeps a misnamed dump from filling the driver's memory
MAX_TABLE_BYTES = 4 << 30


def file_format(path: str) -> str:
    for ending, kind in FORMATS.items():
        if path.lower().endswith(ending):
            return kind
    raise DataError(f"{path}: unknown table format; name it *.parquet, *.csv or *.jsonl")


def read_table(path: str, storage: StorageOptions | None = None, max_bytes: int = MAX_TABLE_BYTES) -> pa.Table:
    """A Parquet/CSV/JSONL file as an Arrow table (ids as strings), bounded in size; one DataError naming the file."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq
    kind = file_format(path)
    fs, inner = filesystem(path, storage)
    try:
        size = fs.size(inner)
        if size is not None and size > max_bytes:
            raise DataError(f"{path}: {size:,} bytes, more than the {max_bytes:,} this reader accepts")
        with fs.open(inner, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    if len(data) > max_bytes:
        raise DataError(f"{path}: more than the {max_bytes:,} bytes this reader accepts")
    try:
        if kind == "parquet":
            table = pq.read_table(pa.BufferReader(data))
        elif kind == "csv":  # ids typed as strings up front: "007" stays "007"
            types = {c: pa.string() for c in ("user_id", "item_id", "split", "history")}
            table = pcsv.read_csv(io.BytesIO(data), convert_options=pcsv.ConvertOptions(column_types=types))
        else:
            table = pjson.read_json(io.BytesIO(data))
        return _ids_as_strings(table)
    except (pa.ArrowException, ValueError) as e:
        raise DataError(f"{path}: unreadable {kind} ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def has_column(path: str, column: str, storage: StorageOptions | None = None) -> bool:
    """Whether a Parquet file's schema names `column` (its footer only is read)."""
    import pyarrow.parquet as pq
    fs, inner = filesystem(path, storage)
    try:
        with fs.open(inner, "rb") as f:
            return column in pq.read_schema(f).names
    except (OSError, pa.ArrowException):
        return False


def _ids_as_strings(table: pa.Table) -> pa.Table:
    """Numeric-looking ids (JSON numbers, Parquet integers) are ids all the same: strings, as the contract says."""
    for column in ("user_id", "item_id"):
        if column in table.column_names and not pa.types.is_string(table.schema.field(column).type):
            table = table.set_column(table.column_names.index(column), column, table.column(column).cast(pa.string()))
    return table


def _frame(table: pa.Table, path: str) -> pd.DataFrame:
    for column in ("user_id", "item_id"):  # before pandas: invalid UTF-8 would be a traceback there
        if column in table.column_names:
            check_id_column(table.column(column), column, path, DataError)
    return table.to_pandas()


def _histories(column: pd.Series, path: str) -> list[list[str]]:
    out = []
    for row, value in enumerate(column):
        if isinstance(value, str):  # CSV: a JSON list in the cell
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise DataError(f"{path} row {row}: history is not a JSON list of item ids") from None
        if value is None or not hasattr(value, "__iter__") or isinstance(value, (str, dict)):
            raise DataError(f"{path} row {row}: history is not a list of item ids")
        out.append([str(v) for v in value])
    return out


def load_generic(records_path: str, items_path: str, task: str = "rating", valid_frac: float = 0.1,
                 test_frac: float = 0.1, name: str = "generic", storage: StorageOptions | None = None) -> Dataset:
    """The user's logs → a validated Dataset; split chronologically here unless the records carry `split`."""
    records = _frame(read_table(records_path, storage), records_path)
    items = _frame(read_table(items_path, storage), items_path)
    for frame, path, needed in ((records, records_path, ("user_id", "item_id", "label", "timestamp")),
                                (items, items_path, ("item_id", "text"))):
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise DataError(f"{path}: lacks column(s) {missing}")
    given_split = "split" in records.columns
    extra = {c: records[c] for c in ("split", "history") if c in records.columns}
    try:
        records, items = normalise(records, items)
    except (ValueError, TypeError) as e:
        raise DataError(f"{records_path}: a column is not of its type ({' '.join(str(e).split())[:200]})") from None
    for column, values in extra.items():
        records[column] = _histories(values, records_path) if column == "history" else values.astype(str)
    if not given_split:
        records = chronological_split(records, valid_frac, test_frac)
    provenance = {"records": records_path, "items": items_path,
                  "split": "given" if given_split else {"rule": "chronological", "valid_frac": valid_frac,
                                                        "test_frac": test_frac}}
    return validate(Dataset(records, items, task, name, provenance), records_path)
