"""Export a store as a 1+N system: in the open formats an import reads, or ready to serve.

    python jobs/export_system.py --store STORE --to DIR --format open [--peft]
    python jobs/export_system.py --store STORE --to DIR --format serving [--dtype bfloat16] [--model FOLDER]

open: system.json + prompts.parquet (+ one PEFT prompt-tuning folder per user with --peft) + head.safetensors and
head.json (docs/bring-your-own.md). serving: per-user prompt tensors for `prompt_embeds` + the template's pieces
embedded once + where the rows and the item go + the readout (head, label token ids): what an inference server
needs to build each request (puma_ray/artifacts/serving_reader.py reads it; docs/bring-your-own.md "Serving").
"""
from __future__ import annotations

import argparse

from puma_ray.artifacts.serving import DTYPES, export_for_serving
from puma_ray.fs import StorageOptions
from puma_ray.importing import export_open
from puma_ray.recipes.runs import exit_job, user_errors_to_exit_code


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", required=True, help="the store to export (local or s3://)")
    p.add_argument("--to", required=True, help="a new or empty folder")
    p.add_argument("--format", required=True, choices=("open", "serving"), help="open formats, or for serving")
    p.add_argument("--peft", action="store_true", help="open: also one PEFT prompt-tuning folder per user")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="serving: tensor dtype")
    p.add_argument("--model", help="serving: the store's model on this machine, when its recorded name does not "
                   "load here (the weights must match the store's fingerprint)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    args = p.parse_args(argv)
    storage = StorageOptions(endpoint_url=args.endpoint_url)

    def run() -> int:
        if args.format == "open":
            system = export_open(args.store, args.to, args.peft, storage)
            print(f"exported {system['exported_from']['users']} users in open formats → {args.to}")
        else:
            export = export_for_serving(args.store, args.to, args.dtype, storage, splice=True, model=args.model)
            print(f"exported {export['users']} users for serving in {len(export['files'])} file(s) → {args.to}")
        return 0

    return user_errors_to_exit_code(run)


def console() -> None:
    """The installed `puma-export` command (pyproject.toml [project.scripts]): main, then exit_job's safe exit."""
    exit_job(main())


if __name__ == "__main__":
    console()
