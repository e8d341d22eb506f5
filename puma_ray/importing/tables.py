"""Readers of a user's prompt table, in the three open forms docs/bring-your-own.md names, every byte untrusted.

- Parquet: `user_id` + one list or fixed-size-list column of l*d floats per user;
- `.npy` (numpy, never pickled objects) or `.safetensors` (one 2-D/3-D tensor) + a JSON list of user ids;
- a folder of per-user PEFT prompt-tuning checkpoints: `<user_id>/adapter_config.json` (peft_type PROMPT_TUNING)
  + `<user_id>/adapter_model.safetensors` holding `prompt_embeddings` (num_virtual_tokens, token_dim).

Each returns (user_ids (n,) str, prompts (n, l*d) float32 or (n, l, d)); a file that breaks its form is one
SystemImportError naming it (and the row or user). Reads are bounded; nothing is unpickled.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from puma_ray.errors import SystemImportError
from puma_ray.fs import child, filesystem, join
from puma_ray.ids import check_id_column, check_ids

# a prompt table is read whole by the import (checks need every row before anything is written): 16 GiB bounds
# a wrong file's damage; 10M users x 4 x 1024 floats is 160 GB, past this bound: import such a table in parts
MAX_TABLE_BYTES = 16 << 30
MAX_JSON_BYTES = 64 << 20  # an id list of 1M ids is ~10 MB; configs are a few KB
PEFT_CONFIG = "adapter_config.json"  # PEFT's own names: a prompt-tuning checkpoint as `save_pretrained` writes it
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_TENSOR = "prompt_embeddings"


def read_bounded(fs, path: str, where: str, max_bytes: int) -> bytes:
    """The whole file, refused (one line naming it) when missing or larger than `max_bytes`."""
    try:
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except (FileNotFoundError, IsADirectoryError):
        raise SystemImportError(f"{where}: no such file") from None
    if len(data) > max_bytes:
        raise SystemImportError(f"{where}: larger than the {max_bytes:,} bytes this import reads")
    return data


def read_json_bounded(fs, path: str, where: str, max_bytes: int = MAX_JSON_BYTES):
    try:
        return json.loads(read_bounded(fs, path, where, max_bytes).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemImportError(f"{where}: not valid JSON ({type(e).__name__})") from None


def _float_rows(values: np.ndarray, where: str) -> np.ndarray:
    if values.dtype.kind not in "fiu":
        raise SystemImportError(f"{where}: values of type {values.dtype} are not numbers")
    return values.astype(np.float32, copy=False)


def read_parquet_table(path: str, column: str, storage=None) -> tuple[np.ndarray, np.ndarray]:
    """user_id + `column` (list or fixed-size list of floats, the same length on every row) → (ids, (n, l*d))."""
    fs, inner = filesystem(path, storage)
    where = f"prompt table {path}"
    try:
        table = pq.read_table(pa.BufferReader(read_bounded(fs, inner, where, MAX_TABLE_BYTES)))
    except pa.ArrowException as e:
        raise SystemImportError(f"{where}: unreadable parquet ({type(e).__name__})") from None
    for name in ("user_id", column):
        if name not in table.column_names:
            raise SystemImportError(f"{where}: no column {name!r} (columns: {table.column_names[:8]})")
    ids_col = table.column("user_id")
    if not pa.types.is_string(ids_col.type) and not pa.types.is_large_string(ids_col.type):
        ids_col = ids_col.cast(pa.string())
    check_id_column(ids_col, "user id", where, SystemImportError)
    col = table.column(column).combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise SystemImportError(f"{where}: column {column!r} is {col.type}, not a list of floats")
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise SystemImportError(f"{where} row {row}: no prompt (null)")
    lengths = (np.full(len(col), col.type.list_size) if pa.types.is_fixed_size_list(col.type)
               else np.diff(col.offsets.to_numpy()))
    if len(lengths) and (lengths != lengths[0]).any():
        row = int(np.flatnonzero(lengths != lengths[0])[0])
        raise SystemImportError(f"{where} row {row}: {lengths[row]} floats where row 0 has {lengths[0]}")
    values = _float_rows(col.flatten().to_numpy(zero_copy_only=False), where)
    ids = ids_col.to_numpy(zero_copy_only=False).astype(str)
    return ids, values.reshape(len(ids), int(lengths[0]) if len(lengths) else 0)


def read_id_list(path: str, storage=None) -> np.ndarray:
    fs, inner = filesystem(path, storage)
    ids = read_json_bounded(fs, inner, f"user id list {path}")
    if not isinstance(ids, list):
        raise SystemImportError(f"user id list {path}: not a JSON list of user ids")
    check_ids(ids, "user id", f"user id list {path}", SystemImportError)
    return np.asarray([str(u) for u in ids], dtype=str)


def read_array_table(path: str, ids_path: str, storage=None) -> tuple[np.ndarray, np.ndarray]:
    """A `.npy` array or a `.safetensors` file of one tensor, (n, l, d) or (n, l*d), + a JSON id list of n ids."""
    fs, inner = filesystem(path, storage)
    where = f"prompt table {path}"
    data = read_bounded(fs, inner, where, MAX_TABLE_BYTES)
    try:
        if path.endswith(".npy"):
            prompts = np.load(io.BytesIO(data), allow_pickle=False)  # object arrays refused: nothing unpickled
        else:
            from safetensors.numpy import load as st_load
            tensors = st_load(data)
            if len(tensors) != 1:
                raise SystemImportError(f"{where}: {len(tensors)} tensors; a prompt table holds exactly one")
            prompts = next(iter(tensors.values()))
    except SystemImportError:
        raise
    except Exception as e:  # untrusted bytes: any parse failure is the same one line
        raise SystemImportError(f"{where}: not a readable {path.rsplit('.', 1)[-1]} array "
                                f"({type(e).__name__})") from None
    if prompts.ndim not in (2, 3):
        raise SystemImportError(f"{where}: a {prompts.ndim}-D array; expected (users, l, d) or (users, l*d)")
    ids = read_id_list(ids_path, storage)
    if len(ids) != len(prompts):
        raise SystemImportError(f"{where}: {len(prompts)} rows but {ids_path} lists {len(ids)} user ids")
    return ids, _float_rows(prompts, where)


def read_peft_folders(path: str, storage=None) -> tuple[np.ndarray, np.ndarray]:
    """One PEFT prompt-tuning checkpoint per user folder (the folder's name is the user id) → (ids, (n, l, d))."""
    from safetensors.numpy import load as st_load
    fs, root = filesystem(path, storage)
    if not fs.isdir(root):
        raise SystemImportError(f"PEFT folder {path}: no such folder")
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if fs.isdir(p))
    if not names:
        raise SystemImportError(f"PEFT folder {path}: no per-user checkpoint folders")
    check_ids(names, "user id (folder name)", f"PEFT folder {path}", SystemImportError)
    ids, rows, shape = [], [], None
    for name in names:
        folder = child(root, name, f"PEFT folder {path}", SystemImportError)
        where = f"PEFT checkpoint {join(path, name)}"
        config = read_json_bounded(fs, join(folder, PEFT_CONFIG), f"{where}/{PEFT_CONFIG}", 1 << 20)
        if not isinstance(config, dict) or config.get("peft_type") != "PROMPT_TUNING":
            found = config.get("peft_type") if isinstance(config, dict) else None
            raise SystemImportError(f"{where}/{PEFT_CONFIG}: peft_type is {found!r}, not PROMPT_TUNING")
        try:
            tensors = st_load(read_bounded(fs, join(folder, PEFT_WEIGHTS), f"{where}/{PEFT_WEIGHTS}", 1 << 30))
        except SystemImportError:
            raise
        except Exception as e:
            raise SystemImportError(f"{where}/{PEFT_WEIGHTS}: not a readable safetensors file "
                                    f"({type(e).__name__})") from None
        if PEFT_TENSOR not in tensors or tensors[PEFT_TENSOR].ndim != 2:
            raise SystemImportError(f"{where}/{PEFT_WEIGHTS}: no 2-D {PEFT_TENSOR!r} tensor")
        prompt = _float_rows(tensors[PEFT_TENSOR], where)
        declared = config.get("num_virtual_tokens")
        if declared is not None and declared != prompt.shape[0]:
            raise SystemImportError(f"{where}: {PEFT_TENSOR} has {prompt.shape[0]} rows, num_virtual_tokens "
                                    f"says {declared}")
        if shape is not None and prompt.shape != shape:
            raise SystemImportError(f"{where}: prompt of shape {prompt.shape}, where the first user's is {shape}")
        shape = prompt.shape
        ids.append(name)
        rows.append(prompt)
    return np.asarray(ids, dtype=str), np.stack(rows)
