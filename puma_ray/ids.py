"""What a user or item id may be, checked wherever ids are read (records, stores, conversion inputs).

An id is valid UTF-8, non-empty, at most MAX_ID_CHARS characters, and holds no control character. Why each rule:
invalid UTF-8 fails deep inside numpy/pandas with a traceback; a NUL is dropped by numpy's fixed-width strings
('u\\0' becomes 'u', so two users collide: "user 'u' written twice"); other control characters break the one-line
error messages and the logs that name a user; an unbounded id is a row that costs unbounded memory in every index.
A bad id is one error naming the file (or table) and the row, never a traceback.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_ID_CHARS = 256  # real ids are short (MovieLens "196", Amazon "A3SGXH7AUHU8GW", MIND "U13740"): 256 is ample
_CONTROL = r"[\x00-\x1f\x7f]"


def id_problem(value) -> str | None:
    """Why `value` is not a valid id, or None when it is."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return "is not valid UTF-8"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return None  # an integer id (a Parquet int column) is read as its decimal string: always valid
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not a string"
    if value == "":
        return "is empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: what Python makes of undecodable bytes
        return "is not valid UTF-8"
    if len(value) > MAX_ID_CHARS:
        return f"is longer than {MAX_ID_CHARS} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "holds a control character (NUL, newline, ...)"
    return None


def _first_bad(values) -> tuple[int, object, str] | None:
    for row, value in enumerate(values):
        problem = id_problem(value)
        if problem:
            return row, value, problem
    return None


def _fail(found: tuple[int, object, str], what: str, where: str, error: type[Exception]):
    row, value, problem = found
    shown = repr(value[:40] + (b"..." if isinstance(value, bytes) else "...") if len(value) > 40 else value) \
        if isinstance(value, (str, bytes)) else repr(value)
    raise error(f"{where}: {what} at row {row} {problem}: {shown}")


def check_id_column(column, what: str, where: str, error: type[Exception]) -> None:
    """Checks an Arrow string column (as read from Parquet, before any conversion to numpy or pandas, which is
    where invalid UTF-8 and NULs would go wrong); vectorised, with a Python scan only to name the first bad row."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_integer(column.type):
        return  # integer ids become their decimal strings: nothing to check
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise error(f"{where}: {what} column is {column.type}, not a string (or integer) column")
    try:
        column.validate(full=True)  # full: checks every value is valid UTF-8
    except pa.ArrowInvalid:
        _fail(_first_bad(column.cast(pa.large_binary()).to_pylist()) or (0, None, "is not valid UTF-8"), what,
              where, error)
    if column.null_count:
        _fail((int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0]), None, "is missing"), what,
              where, error)
    bad = pc.or_(pc.or_(pc.equal(pc.utf8_length(column), 0), pc.greater(pc.utf8_length(column), MAX_ID_CHARS)),
                 pc.match_substring_regex(column, _CONTROL))
    if pc.any(bad).as_py():
        row = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
        value = column[row].as_py()
        _fail((row, value, id_problem(value) or "is not a valid id"), what, where, error)


def check_ids(values, what: str, where: str, error: type[Exception]) -> None:
    """Checks Python / numpy / pandas ids (e.g. what a caller hands to a store writer) the same way."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return check_id_column(values, what, where, error)
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    if all(isinstance(v, str) for v in values):
        try:
            return check_id_column(pa.array(values, pa.string()), what, where, error)
        except (UnicodeEncodeError, pa.ArrowException):  # lone surrogates: named by the Python scan below
            pass
    found = _first_bad(values)
    if found:
        _fail(found, what, where, error)
