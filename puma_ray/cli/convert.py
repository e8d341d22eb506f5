"""Convert every user of the source store(s) with a fitted adapter into a complete, verified target store.

    python jobs/convert.py --adapter A --source S [--source S2 ...] --output T [--engine ray|local] [--overwrite]
    python jobs/convert.py --verify T [--source S ...]        re-read T: checksums, counts, user sets; exit 1 if off
    python jobs/convert.py --export T --to DIR [--dtype bfloat16]   per-user (l, d) tensors for an inference server

Conversion runs on a Ray Data actor pool (a local Ray is started when no cluster address is known; `ray job
submit` sets one) or, with --engine local, in this process. Rerunning the same command after an interruption
finishes the job without redoing completed shards. Paths may be local or s3:// (endpoint and keys from
--endpoint-url or the standard AWS environment).
"""
from __future__ import annotations

import argparse
import json
import sys

from puma_ray.artifacts.serving import DTYPES, export_for_serving
from puma_ray.artifacts.store import StoreError
from puma_ray.artifacts.verify import verify_store
from puma_ray.conversion.run import MISSING_POLICIES, ConvertConfig, convert, run_locally
from puma_ray.errors import ConfigError, PumaError
from puma_ray.fs import StorageOptions, redact_text
from puma_ray.recipes.runs import describe_error, exit_job


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--adapter", help="fitted adapter folder (puma_adapter.json + safetensors)")
    what.add_argument("--verify", metavar="STORE", help="verify a store against its manifest and sources")
    what.add_argument("--export", metavar="STORE", help="export a store's prompts for serving (needs --to)")
    p.add_argument("--source", action="append", default=None,
                   help="source store; repeat for aggregated conversion (order = the adapter's sources)")
    p.add_argument("--output", help="target store to write")
    p.add_argument("--model", help="--verify: also check the store's fingerprint against this model's weights "
                                   "(hub id or local folder, loaded like the jobs load it)")
    p.add_argument("--to", help="export folder")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="export dtype")
    p.add_argument("--engine", default="ray", choices=("ray", "local"),
                   help="ray: units on a Ray Data actor pool (a local Ray unless --address or RAY_ADDRESS); "
                        "local: in this process")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--actors", type=int, default=ConvertConfig.actors, help="actor pool size (one per GPU on GPUs)")
    p.add_argument("--cpus-per-actor", type=float, default=ConvertConfig.cpus_per_actor,
                   help="fractional CPUs per actor: leave some for Ray Data's own tasks")
    p.add_argument("--gpus-per-actor", type=float, default=ConvertConfig.gpus_per_actor,
                   help="1 on a GPU cluster: the adapter runs there")
    p.add_argument("--threads-per-actor", type=int, default=ConvertConfig.threads_per_actor,
                   help="torch threads per actor (actors x threads <= cores)")
    p.add_argument("--batch-rows", type=int, default=ConvertConfig.batch_rows,
                   help="rows per adapter forward (bounds activation memory)")
    p.add_argument("--missing-policy", default="error", choices=MISSING_POLICIES,
                   help="aggregated: a user absent from one source fails the run, or goes to the rejects table")
    p.add_argument("--max-prompt-scale", type=float, default=ConvertConfig.max_prompt_scale,
                   help="reject (with its reason, in the rejects table) a prompt whose RMS is beyond this many x "
                        "the adapter's source scale; 0: no check")
    p.add_argument("--overwrite", action="store_true", help="replace a finished store or another conversion")
    p.add_argument("--no-progress", action="store_true", help="no rows/s bar on stderr")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    return p


def _convert(args, storage: StorageOptions) -> int:
    if not args.source or not args.output:
        raise ConfigError("--adapter needs --source (one or more) and --output")
    cfg = ConvertConfig(actors=args.actors, cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                        threads_per_actor=args.threads_per_actor, batch_rows=args.batch_rows,
                        missing_policy=args.missing_policy, max_prompt_scale=args.max_prompt_scale,
                        overwrite=args.overwrite, progress=not args.no_progress)
    runner = run_locally
    if args.engine == "ray":
        from puma_ray.ray_layer import ensure_ray, run_on_ray
        from puma_ray.ray_layer.session import quiet_data
        ensure_ray(args.address)
        quiet_data()  # the driver's own bar counts prompts; Ray Data's bars would count units
        runner = run_on_ray
    summary = convert(args.adapter, args.source, args.output, cfg, storage, runner, log=print)
    print(f"converted {summary['users']} users, rejected {summary['rejected']} "
          f"({summary['rejected_by_reason'] or 'none'}), {summary['units_run']} of {summary['units']} shard(s) "
          f"this run, {summary['wall_s']} s, {summary['rows_per_s']} rows/s → {args.output}")
    print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    storage = StorageOptions(endpoint_url=args.endpoint_url)
    try:
        if args.verify:
            try:
                summary = verify_store(args.verify, args.source, storage, model=args.model)
            except StoreError as e:
                print(f"verify FAILED: {redact_text(str(e))}", file=sys.stderr)
                return 1
            print(f"verify ok: {json.dumps(summary)}")
            return 0
        if args.export:
            if not args.to:
                raise ConfigError("--export needs --to DIR")
            export = export_for_serving(args.export, args.to, args.dtype, storage)
            print(f"exported {export['users']} users in {len(export['files'])} file(s) → {args.to}")
            return 0
        return _convert(args, storage)
    except (PumaError, OSError) as e:
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return 2


def console() -> None:
    """The installed `puma-convert` command (pyproject.toml [project.scripts]): main, then exit_job's safe exit."""
    exit_job(main())


if __name__ == "__main__":
    console()
