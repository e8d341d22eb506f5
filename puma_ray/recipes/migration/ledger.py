"""A migration's run ledger: one record per finished stage, so that a rerun of the same command with the same
`--output` skips every stage whose inputs are unchanged.

A stage's identity is a hash (training/run_identity.RunIdentity) of the settings it reads, the identities of the
stages it reads from and the package version; `<output>/ledger/<stage>.json` holds that identity and what a later
run needs to get the stage's output back (runs, figures, user ids; the few tensors in safetensors beside it),
written last and atomically: a stage killed half-way has no record and runs again. A record whose identity differs
(a changed setting upstream) is not reused, and neither is anything downstream of it, since their identities
include it. Records are input like any other file: read as JSON, checked, never unpickled; paths are never taken
from them (they come from the config).
"""
from __future__ import annotations

import datetime as _dt

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from puma_ray import __version__
from puma_ray.artifacts.formats import LEDGER_DIR, LEDGER_FORMAT
from puma_ray.errors import StoreError
from puma_ray.fs import StorageOptions, filesystem, join, read_json, write_file, write_json
from puma_ray.training.cost import Cost
from puma_ray.training.run_identity import RunIdentity

MUST_RUN = object()  # what a stage's restore returns when the artifacts are not what its record says
_FORMAT_KIND = LEDGER_FORMAT.rsplit("/", 1)[0] + "/"  # any version's records are ours
_MAX_RECORD_BYTES = 64 << 20  # a selection of 100k users' ids is ~2 MB; anything far larger is not ours


def stage_identity(stage: str, settings: dict, inputs: dict[str, str]) -> str:
    """The hash naming one stage's work: its settings ({dotted key: value}) and its inputs' identities."""
    ident = RunIdentity(f"migration-stage:{stage}")
    ident.add("settings", settings)
    ident.add("inputs", inputs)
    return ident.hexdigest()


def settings_of(cfg_dict: dict, keys: tuple[str, ...]) -> dict:
    """{dotted key: value} of the config (as a dict) at each key: what a stage's identity reads."""
    out = {}
    for key in keys:
        value = cfg_dict
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out[key] = value
    return out


def cost_from(state, where: str) -> Cost:
    """A Cost back from its `state()` in a record; anything but those numeric fields is a StoreError."""
    fields = Cost().state()
    if not isinstance(state, dict) or set(state) - set(fields) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in state.values()):
        raise StoreError(f"{where}: cost is not a cost record")
    return Cost(**state)


class Ledger:
    def __init__(self, output: str, storage: StorageOptions | None = None, log=print):
        self.folder = join(output, LEDGER_DIR)
        self.fs, self.root = filesystem(self.folder, storage)
        self.log = log

    def _path(self, stage: str, suffix: str = ".json") -> str:
        return join(self.root, f"{stage}{suffix}")

    def _read(self, stage: str) -> dict | None:
        """The record file of `stage` as JSON; None if absent. A file there that is no ledger record of any
        puma_ray version is a StoreError naming it: this package never writes it, and never overwrites it."""
        path = self._path(stage)
        if not self.fs.exists(path):
            return None
        shown = join(self.folder, f"{stage}.json")
        if self.fs.size(path) > _MAX_RECORD_BYTES:
            raise StoreError(f"{shown}: {self.fs.size(path):,} bytes, larger than any ledger record this package "
                             "writes; not ours (move it away)")
        record = read_json(self.fs, path, f"{shown} (not written by this package; move it away)", StoreError)
        if not isinstance(record, dict) or not str(record.get("format", "")).startswith(_FORMAT_KIND):
            raise StoreError(f"{shown}: not a ledger record; not written by this package (move it away)")
        return record

    def finished(self, stage: str, identity: str) -> dict | None:
        """The output record of `stage` when it finished with this identity; None (with a line saying why when a
        record exists) when it must run."""
        record = self._read(stage)
        if record is None:
            return None
        if record.get("format") != LEDGER_FORMAT:
            self.log(f"stage {stage}: its ledger record is of another puma_ray version; it runs again")
            return None
        if record.get("identity") != identity:
            self.log(f"stage {stage}: its settings or inputs changed since {record.get('finished_at', '?')}; "
                     "it runs again, with every stage after it that reads it")
            return None
        output = record.get("output")
        if not isinstance(output, dict):
            raise StoreError(f"{join(self.folder, stage + '.json')}: output is not a JSON object")
        return output

    def record(self, stage: str, identity: str, output: dict, wall_s: float) -> None:
        """The stage's record, written last: from now on a rerun reuses it."""
        self.fs.makedirs(self.root, exist_ok=True)
        write_json(self.fs, self._path(stage), {
            "format": LEDGER_FORMAT, "stage": stage, "identity": identity, "package": f"puma_ray {__version__}",
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(wall_s, 3), "output": output})

    def write_tensors(self, stage: str, tensors: dict) -> None:
        """Tensors a stage's record needs (safetensors: no code runs on load), written before the record."""
        self.fs.makedirs(self.root, exist_ok=True)
        write_file(self.fs, self._path(stage, ".safetensors"),
                   save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))

    def read_tensors(self, stage: str) -> dict:
        path = self._path(stage, ".safetensors")
        try:
            with self.fs.open(path, "rb") as f:
                return load_tensors(f.read())
        except (FileNotFoundError, OSError, ValueError, RuntimeError) as e:  # safetensors' parse errors included
            raise StoreError(f"{join(self.folder, stage + '.safetensors')}: unreadable ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None

    def forget(self, stage: str) -> bool:
        """Drops `stage`'s record before the stage runs again: a record of an old identity must not outlive a
        rerun killed half-way (its outputs, e.g. the adapter, already rewritten under the new one). Only a ledger
        record (ours) is removed, its tensors file with it. True when there was one."""
        if self._read(stage) is None:
            return False
        if self.fs.exists(self._path(stage, ".safetensors")):
            self.fs.rm(self._path(stage, ".safetensors"))
        self.fs.rm(self._path(stage))
        return True
