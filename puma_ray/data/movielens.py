"""MovieLens-100K from the installed recbole package (files under recbole/dataset_example/ml-100k/).

ml-100k.inter: user_id:token, item_id:token, rating:float, timestamp:float (tab-separated, header row)
ml-100k.item:  item_id:token, movie_title:token_seq, release_year:token, class:token_seq (genres, space-separated)
The package is located, never imported (its import pulls dependencies that conflict with ours), and its data is
never copied into this repository (the licence forbids redistribution).
"""
from __future__ import annotations

import importlib.util
import os

import pandas as pd

from .records import DataError, Dataset, chronological_split, normalise, validate


def movielens_folder() -> str:
    spec = importlib.util.find_spec("recbole")  # finds the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MovieLens-100K needs the recbole package: pip install --no-deps recbole==1.2.1 "
                        "(scripts/setup.sh does this)")
    folder = os.path.join(spec.submodule_search_locations[0], "dataset_example", "ml-100k")
    if not os.path.exists(os.path.join(folder, "ml-100k.inter")):
        raise DataError(f"{folder}/ml-100k.inter not found: is recbole==1.2.1 installed?")
    return folder


def _genres(raw: str) -> str:
    return ", ".join(g for g in str(raw).split() if g and g != "nan")


def load_movielens100k(folder: str | None = None, valid_frac: float = 0.1, test_frac: float = 0.1) -> Dataset:
    folder = folder or movielens_folder()
    inter_path, item_path = os.path.join(folder, "ml-100k.inter"), os.path.join(folder, "ml-100k.item")
    try:
        inter = pd.read_csv(inter_path, sep="\t", dtype=str)
        items = pd.read_csv(item_path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError) as e:
        raise DataError(f"MovieLens-100K: cannot read {folder}: {e}") from e
    inter.columns = [c.split(":")[0] for c in inter.columns]
    items.columns = [c.split(":")[0] for c in items.columns]
    records = pd.DataFrame({
        "user_id": inter["user_id"], "item_id": inter["item_id"],
        "label": pd.to_numeric(inter["rating"]), "timestamp": pd.to_numeric(inter["timestamp"]).astype("int64"),
    })
    year = items["release_year"].where(items["release_year"].str.len() > 0)
    text = items["movie_title"] + year.map(lambda y: f" ({y})", na_action="ignore").fillna("") \
        + items["class"].map(lambda g: f", genres: {_genres(g)}" if _genres(g) else "")
    item_table = pd.DataFrame({"item_id": items["item_id"], "text": text})
    records, item_table = normalise(records, item_table)
    records = chronological_split(records, valid_frac, test_frac)
    return validate(Dataset(records=records, items=item_table, task="rating", name="movielens100k",
                            provenance={"source": "recbole==1.2.1 dataset_example/ml-100k", "folder": folder,
                                        "valid_frac": valid_frac, "test_frac": test_frac}))
