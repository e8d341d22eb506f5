"""Import your own 1+N system (docs/bring-your-own.md) as a verified store bound to your model.

    python jobs/import_system.py --system FOLDER --output STORE [--allow-out-of-scale] [--overwrite]

FOLDER (local or s3://) holds system.json and the files it names. Every refusal is one `error:` line naming the
file, row or user, exit 2, and nothing is written.
"""
from __future__ import annotations

import argparse

from puma_ray.fs import StorageOptions
from puma_ray.importing import ImportConfig, import_system
from puma_ray.recipes.runs import exit_job, user_errors_to_exit_code


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system", required=True, help="folder holding system.json (local or s3://)")
    p.add_argument("--output", required=True, help="the store to write (local or s3://)")
    p.add_argument("--max-scale-ratio", type=float, default=ImportConfig.max_scale_ratio,
                   help="refuse prompts whose RMS is beyond this many x the model's embedding RMS")
    p.add_argument("--allow-out-of-scale", action="store_true", help="import out-of-scale prompts anyway")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --output")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    args = p.parse_args(argv)
    cfg = ImportConfig(system=args.system, output=args.output, max_scale_ratio=args.max_scale_ratio,
                       allow_out_of_scale=args.allow_out_of_scale, overwrite=args.overwrite,
                       storage=StorageOptions(endpoint_url=args.endpoint_url))
    return user_errors_to_exit_code(lambda: import_system(cfg) and 0)


def console() -> None:
    """The installed `puma-import` command (pyproject.toml [project.scripts]): main, then exit_job's safe exit."""
    exit_job(main())


if __name__ == "__main__":
    console()
