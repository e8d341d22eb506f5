"""Write a job config's dataset as the Parquet pair the lean driver reads (records with their split + items).

    .venv/bin/python scripts/to_parquet.py --config configs/X.yaml --output s3://BUCKET/puma/data/X

The loader of the config's `data:` section runs once here (filters, k-core, chronological split, the checks on
every file), then `records.parquet` and `items.parquet` are written under --output (local or s3://, the config's
`storage:`). It prints the `data:` section a migrate config with `engine: {driver: lean}` then uses: the cluster
reads those files where they lie, and the driver never loads the records again. This process holds the whole
dataset once: run it on a machine with the memory for it (Amazon Movies & TV: a few GB).
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from puma_ray.config import DataConfig, from_dict, load_yaml  # noqa: E402
from puma_ray.data import load_dataset, save_dataset  # noqa: E402
from puma_ray.errors import PumaError  # noqa: E402
from puma_ray.fs import StorageOptions  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="a job config with a data: section (and storage: for s3://)")
    ap.add_argument("--output", required=True, help="folder for records.parquet + items.parquet")
    args = ap.parse_args(argv)
    try:
        raw = load_yaml(args.config) or {}
        data = from_dict(DataConfig, raw.get("data"), f"{args.config} data")
        storage = from_dict(StorageOptions, raw.get("storage"), f"{args.config} storage")
        ds = load_dataset(data, storage)
        paths = save_dataset(ds, args.output, storage)
    except PumaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{ds.summary()}\nwritten; the lean driver's data section:")
    print(yaml.safe_dump({"data": {"name": "parquet", "paths": paths, "options": {"task": ds.task,
                                                                                  "name": ds.name}}},
                         sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
