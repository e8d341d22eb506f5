"""One home for every artifact's file names and format id, and the one check of a format id on load.

A reader refuses a format it does not know with one line naming the file (an adapter of a newer version, a
folder that is not an adapter at all), instead of failing later on a missing key. Format ids are
"<kind>/<version>"; a version is bumped whenever a reader of the old one would misread the new files.
"""
from __future__ import annotations

import hashlib

# ---- prompt store (artifacts/store.py)
STORE_FORMAT_VERSION = 1  # manifest.json "format_version" (an integer since the first stores)
STORE_MANIFEST = "manifest.json"  # written last: a folder without it is incomplete
STORE_HEAD = "head.safetensors"
STORE_SHARD_DIR = "shards"

# ---- adapter (artifacts/adapter_io.py)
ADAPTER_FORMAT = "puma_ray.adapter/1"
ADAPTER_CONFIG = "puma_adapter.json"  # written last; not PEFT's adapter_config.json, which holds another schema
# adapters written before the rename: still read (adapter_io.adapter_config_name is the one place), never written
ADAPTER_CONFIG_LEGACY = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_HEAD = "head.safetensors"  # the target head trained alongside the adapter

# ---- conversion output, besides the store's own files (conversion/units.py)
CONVERSION_IDENTITY = "_conversion.json"
CONVERSION_PROGRESS_DIR = "_progress"
CONVERSION_REJECTS_DIR = "rejects"

# ---- every output a conversion or export writes (artifacts/lock.py): held by the one writer at a time
OUTPUT_LOCK = "_lock"

# ---- serving export (artifacts/serving.py)
SERVING_FORMAT = "puma_ray.serving/1"
SERVING_EXPORT = "export.json"  # written last: lists every file of the export
SERVING_EXPORT_PENDING = "_export_pending.json"  # written first, removed last: an interrupted export's file names
# the template spliced in (artifacts/serving_splice.py writes, artifacts/serving_reader.py reads): export.json's
# "splice" names these; an export without them (jobs/convert.py --export) holds the per-user rows only
SERVING_SPLICE_FORMAT = "puma_ray.serving-splice/1"
SERVING_SPLICE = "splice.json"  # the recipe: pieces in order, where the user's rows go, item/history rules, readout
SERVING_PIECES = "template_pieces.safetensors"  # the template's fixed pieces, embedded once (+ their token ids)
SERVING_READOUT = "readout.safetensors"  # the label tokens' output-layer rows (for a server giving hidden states)

# ---- foundation model folder (recipes/foundation.py): in the cache key, so a recipe change never reuses a folder
FOUNDATION_FORMAT = "puma-foundation/2"
FOUNDATION_CARD = "foundation_card.json"  # written last

# ---- adapter-fit checkpoints on Ray Train (ray_layer/train.py): tensors in safetensors, state in JSON
FIT_STATE = "fit_state.json"
FIT_BEST = "best.safetensors"
FIT_CURRENT = "current.safetensors"
FIT_OPTIMIZER_PREFIX = "optimizer-rank"  # + rank + .safetensors: each rank's Adam moments (ZeRO partitions)

# ---- a 1+N system in open formats, going in (importing/) and coming out (export --format open)
SYSTEM_FORMAT = "puma_ray.system/1"
SYSTEM_SPEC = "system.json"  # names every part of the system, by path relative to its folder; written last
OPEN_HEAD_FORMAT = "puma_ray.head/1"  # the head JSON naming its layers (importing/readout.py)
OPEN_PROMPTS = "prompts.parquet"  # user_id + prompt: fixed_size_list<float32>[l*d]
OPEN_PEFT_DIR = "prompts_peft"  # <user_id>/adapter_config.json + adapter_model.safetensors (PEFT prompt tuning)
OPEN_HEAD_WEIGHTS = "head.safetensors"
OPEN_HEAD_LAYERS = "head.json"

# ---- job outputs
REPORT_JSON = "report.json"
# report.json's "format", per job (recipes/runs.write_report stamps it): the keys a reader of that job's report may
# rely on; bumped per job when a key it had changes meaning or goes
REPORT_FORMATS = {job: f"puma_ray.report/{job}/1" for job in ("train_prompts", "migrate", "sweep", "benchmark",
                                                                  "repair")}
REPORT_MD = "report.md"
# ---- the per-user gate of a migration (training/gate.py, reports/gate.py)
GATE_TABLE = "gate/users.parquet"  # one row per user: old/new validation loss, test statistics, verdict
GATE_PLOT = "gate.png"  # beside report.md

# ---- a migration's run ledger (recipes/migration/ledger.py): one record per finished stage, written last
LEDGER_FORMAT = "puma_ray.ledger/1"
LEDGER_DIR = "ledger"  # <output>/ledger/<stage>.json (+ the few tensors a stage's output needs, in safetensors)


def check_format(found, expected: str, where: str, error: type[Exception]) -> None:
    """Raises `error` naming `where` unless `found` is exactly the format id this package reads."""
    if found != expected:
        raise error(f"{where}: format {found!r} is not one this package reads ({expected!r}); "
                    "written by another puma_ray version, or not this kind of artifact")


def sha256_hex(data: bytes) -> str:
    """The checksum every manifest, progress record and identity file uses."""
    return hashlib.sha256(data).hexdigest()
