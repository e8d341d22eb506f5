"""Dataset loaders by name; each returns a `records.Dataset` that satisfies the records/items contract."""
from __future__ import annotations

import os

import numpy as np

from puma_ray.config import DataConfig, from_dict
from puma_ray.errors import ConfigError
from puma_ray.fs import StorageOptions, absolute, is_remote

from .records import DataError, Dataset

LOADERS = ("movielens100k", "amazon", "yelp", "mind", "synthetic", "synthetic_dir", "parquet", "generic")
DataConfig.CHOICES["name"] = lambda: LOADERS  # --help lists them; registered here so config imports no data


def _need(cfg: DataConfig, *keys: str) -> list[str]:
    missing = [k for k in keys if k not in cfg.paths]
    if missing:
        raise DataError(f"data '{cfg.name}' needs data.paths {list(keys)}; missing {missing}")
    return [cfg.paths[k] for k in keys]


def _loader_options(cfg: DataConfig, loader) -> dict:
    """data.options checked against the loader's own keyword options: a misspelt or foreign key (Yelp's is
    min_user_reviews, Amazon's min_user_ratings) or a value of the wrong type is one line naming data.options.<key>
    and the known keys, before any file is read."""
    import inspect
    import typing

    from puma_ray.config import convert_value
    hints = typing.get_type_hints(loader)
    known = [p.name for p in inspect.signature(loader).parameters.values()
             if p.kind is p.KEYWORD_ONLY and p.name not in ("valid_frac", "test_frac", "storage_options")]
    out = {}
    for key, value in cfg.options.items():
        if key in ("valid_frac", "test_frac"):
            raise ConfigError(f"data.options.{key}: set data.{key} instead (the split is the job's, not the loader's)")
        if key not in known:
            raise ConfigError(f"data.options.{key} is not an option of the {cfg.name} loader; known: {known}")
        out[key] = convert_value(hints[key], value, f"data.options.{key}")
    return out


def load_dataset(cfg: DataConfig, storage: StorageOptions | None = None) -> Dataset:
    so = (storage or StorageOptions()).fsspec_kwargs()
    split = {"valid_frac": cfg.valid_frac, "test_frac": cfg.test_frac}
    if cfg.name == "movielens100k":
        from .movielens import load_movielens100k
        ds = load_movielens100k(cfg.paths.get("folder"), **split)
    elif cfg.name == "amazon":
        from .amazon import load_amazon
        ds = load_amazon(*_need(cfg, "reviews", "meta"), storage_options=so, **split,
                         **_loader_options(cfg, load_amazon))
    elif cfg.name == "yelp":
        from .yelp import load_yelp
        ds = load_yelp(*_need(cfg, "reviews", "business"), storage_options=so, **split,
                       **_loader_options(cfg, load_yelp))
    elif cfg.name == "mind":
        from .mind import load_mind
        ds = load_mind(*_need(cfg, "behaviors", "news"), storage_options=so, **split,
                       **_loader_options(cfg, load_mind))
    elif cfg.name == "synthetic":
        from .synthetic import SyntheticConfig, generate_synthetic
        ds = generate_synthetic(from_dict(SyntheticConfig, cfg.options, "data.options"), **split)
    elif cfg.name == "synthetic_dir":
        from .synthetic import read_synthetic
        ds = read_synthetic(*_need(cfg, "folder"), storage_options=so)
    elif cfg.name in ("parquet", "generic"):
        ds = _load_generic(cfg, storage)
    else:
        raise DataError(f"unknown data.name {cfg.name!r}; known: {list(LOADERS)}")
    return limit_users(ds, cfg.max_users)


def _load_generic(cfg: DataConfig, storage: StorageOptions | None) -> Dataset:
    """records + items in the generic records format (data/generic.py: Parquet, CSV or JSONL, local or s3://), split
    chronologically by data.valid_frac/test_frac unless the records carry their own `split` column."""
    from .generic import load_generic
    records_path, items_path = _need(cfg, "records", "items")
    unknown = sorted(set(cfg.options) - {"task", "name"})
    if unknown:
        raise ConfigError(f"data.options.{unknown[0]} is not an option of the {cfg.name} loader; known: "
                          "['task', 'name']")
    return load_generic(records_path, items_path, cfg.options.get("task", "rating"), cfg.valid_frac, cfg.test_frac,
                        cfg.options.get("name", cfg.name), storage)


def records_in_place(cfg: DataConfig, storage: StorageOptions | None = None) -> str | None:
    """The records file Ray may read where it lies (Ray Data shards it): a Parquet file already in the contract,
    `split` column included. None for anything else (CSV/JSONL logs, or logs this package splits itself): the
    driver's loaded Dataset is the source then."""
    if cfg.name != "parquet" or "records" not in cfg.paths:
        return None
    from .generic import file_format, has_column
    path = absolute(cfg.paths["records"])  # Ray's workers read it from a working directory of their own
    return path if file_format(path) == "parquet" and has_column(path, "split", storage) else None


def save_dataset(ds: Dataset, folder: str, storage: StorageOptions | None = None) -> dict[str, str]:
    """Writes records.parquet + items.parquet under folder (local or s3://); returns data.paths for the config."""
    from puma_ray.fs import filesystem, join, write_file
    if not is_remote(folder):
        os.makedirs(folder, exist_ok=True)
    paths = {"records": join(folder, "records.parquet"), "items": join(folder, "items.parquet")}
    for frame, path in ((ds.records, paths["records"]), (ds.items, paths["items"])):
        fs, inner = filesystem(path, storage)
        write_file(fs, inner, frame.to_parquet(index=False))  # bytes, written atomically
    return paths


def limit_users(ds: Dataset, max_users: int | None) -> Dataset:
    """The first `max_users` users in sorted id order (deterministic), and only the items they touch."""
    if not max_users or ds.records["user_id"].nunique() <= max_users:
        return ds
    keep = set(np.sort(ds.records["user_id"].unique())[:max_users])
    records = ds.records[ds.records["user_id"].isin(keep)].reset_index(drop=True)
    touched = set(records["item_id"])
    if "history" in records.columns:  # CTR history titles are item texts too
        touched.update(i for h in records["history"] for i in h)
    items = ds.items[ds.items["item_id"].isin(touched)].reset_index(drop=True)
    return Dataset(records, items, ds.task, ds.name, {**ds.provenance, "max_users": max_users})


__all__ = ["Dataset", "DataError", "load_dataset", "save_dataset", "limit_users", "records_in_place", "LOADERS"]
