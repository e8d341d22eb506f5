"""A full disk never bricks a store: at each write point of a conversion and an export, a real small filesystem
(tmpfs, sized in pages) fills up; the job prints one line naming the file, and once space is back the same
command completes and `--verify` passes, with no file deleted by hand.

Every file these tiny stores write fits one 4 KiB page, so a tmpfs of N pages fails exactly the (N+1)-th write:
conversion writes its `_lock`, `_conversion.json`, then per unit its shard and its progress record, then head
and manifest.
"""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from puma_ray.artifacts.serving import ServingPrompts
from puma_ray.tools.synthetic_prompts import write_synthetic_adapter, write_synthetic_store

USERS, L, D_S, D_T, SHARD = 6, 1, 4, 8, 2  # 3 units; every file < 1 page
PAGE = 4096
UNITS = USERS // SHARD
# the conversion's writes in order (local engine: units in plan order)
CONVERSION_WRITES = ["_lock", "_conversion.json"] + [f for u in range(UNITS) for f in
                                            (f"shards/part-{u:05d}.parquet", f"_progress/part-{u:05d}.parquet.json")] \
    + ["head.safetensors", "manifest.json"]


class Disk:
    """A tmpfs of `pages` pages mounted at `path` (root only: the test is skipped where mounting is not allowed)."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def mount(self, pages: int) -> None:
        """Room for exactly `pages` pages of files: a tmpfs of size 0 is unlimited, so one more page is mounted
        and filled by a file beside the outputs."""
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={(pages + 1) * PAGE}", "tmpfs", str(self.path)],
                       check=True, capture_output=True)
        (self.path / "filler").write_bytes(b"f" * PAGE)

    def resize(self, pages: int) -> None:  # "space is back": the same files, a bigger disk
        subprocess.run(["mount", "-o", f"remount,size={pages * PAGE}", str(self.path)], check=True,
                       capture_output=True)

    def unmount(self) -> None:
        subprocess.run(["umount", str(self.path)], check=False, capture_output=True)


@pytest.fixture
def disk(tmp_path):
    d = Disk(tmp_path / f"disk-{uuid.uuid4().hex[:6]}")
    try:
        d.mount(1)
    except (subprocess.CalledProcessError, FileNotFoundError, PermissionError) as e:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {e}")
    d.unmount()
    yield d
    d.unmount()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("fulldisk")
    return {"source": write_synthetic_store(str(root / "source"), USERS, L, D_S, SHARD),
            "adapter": write_synthetic_adapter(str(root / "adapter"), [D_S], D_T, L, hidden=8)}


def _convert(load_job, made, output: Path, capsys) -> tuple[int, str]:
    code = load_job("convert").main(["--adapter", made["adapter"], "--source", made["source"], "--output",
                                     str(output), "--engine", "local", "--no-progress"])
    out = capsys.readouterr()
    return code, out.out + out.err


def _verify(load_job, store: Path, made, capsys) -> None:
    code = load_job("convert").main(["--verify", str(store), "--source", made["source"]])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "verify ok" in out.out


def _temp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if ".puma-tmp-" in p.name]


@pytest.mark.parametrize("point", ["_lock", "_conversion.json", "shards/part-00000.parquet",
                                   "_progress/part-00001.parquet.json", "head.safetensors", "manifest.json"])
def test_conversion_full_disk_at_each_write_point_recovers(point, disk, made, load_job, capsys):
    pages = CONVERSION_WRITES.index(point)  # room for every write before it, none for it
    disk.mount(pages)
    output = disk.path / "target"
    code, text = _convert(load_job, made, output, capsys)
    assert code == 2
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], text
    assert str(output / point) in errors[0], f"the error names the file it could not write: {errors[0]}"
    assert not (output / "manifest.json").exists()  # never a manifest of an incomplete store
    assert not _temp_files(disk.path)  # a failed atomic write removes its own temporary file

    disk.resize(256)
    code, text = _convert(load_job, made, output, capsys)  # the same command, nothing deleted by hand
    assert code == 0, text
    assert f"converted {USERS} users" in text
    _verify(load_job, output, made, capsys)
    assert not _temp_files(disk.path)


def test_partial_files_of_an_older_version_are_redone_with_one_line(made, load_job, capsys, tmp_path):
    """What a non-atomic writer left at a full disk: a 0-byte manifest, progress record or identity file."""
    for broken in ("manifest.json", "_progress/part-00001.parquet.json", "_conversion.json"):
        output = tmp_path / broken.replace("/", "_")
        assert _convert(load_job, made, output, capsys)[0] == 0
        (output / broken).write_bytes(b"")
        if broken.startswith("_progress"):  # the old writer stopped there: no head, no manifest yet
            (output / "manifest.json").unlink()
            (output / "head.safetensors").unlink()
        code, text = _convert(load_job, made, output, capsys)
        assert code == 0, text
        notes = [line for line in text.splitlines() if "unreadable" in line]
        assert len(notes) == 1 and "treated as absent and redone" in notes[0], text
        _verify(load_job, output, made, capsys)
        assert json.loads((output / broken).read_text())  # rewritten whole


def test_export_full_disk_at_each_write_point_recovers(disk, made, load_job, capsys, tmp_path):
    store = tmp_path / "store"
    assert _convert(load_job, made, store, capsys)[0] == 0
    # the export's writes: the pending record, one file per shard, export.json
    writes = ["_lock", "_export_pending.json"] + [f"prompts-part-{u:05d}.safetensors" for u in range(UNITS)] \
        + ["export.json"]
    for point in ("prompts-part-00001.safetensors", "export.json"):
        disk.mount(writes.index(point))
        out = disk.path / "serve"
        code = load_job("convert").main(["--export", str(store), "--to", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("error:") == 1 and str(out / point) in err and "No space" in err, err
        assert not (out / "export.json").exists() or point != "export.json"
        disk.resize(256)
        code = load_job("convert").main(["--export", str(store), "--to", str(out)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "not writable" not in captured.err  # no torch warning on the console
        assert len(ServingPrompts(str(out)).users) == USERS
        assert sorted(os.listdir(out)) == sorted(writes[2:])  # lock and pending record removed: ours, done with
        disk.unmount()


def test_a_partial_manifest_of_a_trained_store_is_rewritten(tmp_path, capsys):
    """A store writer (train_prompts, the full-retraining baseline) rerun over a store whose manifest an older
    version left truncated: one line, and the store is written whole (no 'already exists' dead end)."""
    path = tmp_path / "store"
    write_synthetic_store(str(path), USERS, L, D_S, SHARD)
    (path / "manifest.json").write_bytes(b'{"model": {"na')
    write_synthetic_store(str(path), USERS, L, D_S, SHARD)
    assert "treated as absent" in capsys.readouterr().out
    from puma_ray.artifacts.verify import verify_store
    assert verify_store(str(path))["users"] == USERS
