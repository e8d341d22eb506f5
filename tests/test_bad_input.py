"""Bad input of a new round: export folders holding the user's files, configs that explode or are not text,
ids with NUL or invalid UTF-8, prompts far out of scale. Each is one line naming the file, field, row or user
(exit 2 for a job), early, with nothing of the user's overwritten."""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from puma_ray.artifacts.formats import sha256_hex
from puma_ray.artifacts.serving import ServingPrompts, export_for_serving
from puma_ray.artifacts.store import PromptStore, StoreError, StoreWriter
from puma_ray.config import ConfigError, DataConfig, load_yaml
from puma_ray.conversion.run import ConvertConfig, convert, join_sources
from puma_ray.data import load_dataset
from puma_ray.errors import DataError
from puma_ray.recipes.runs import apply_overrides
from puma_ray.tools.synthetic_prompts import synthetic_identity, write_synthetic_adapter, write_synthetic_store

ROOT = Path(__file__).resolve().parents[1]
USERS, L, D_S, D_T, SHARD = 12, 1, 4, 8, 4


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("badinput")
    source = write_synthetic_store(str(root / "source"), USERS, L, D_S, SHARD)
    adapter = write_synthetic_adapter(str(root / "adapter"), [D_S], D_T, L, hidden=8)
    target = str(root / "target")
    convert(adapter, [source], target, ConvertConfig(progress=False), log=lambda *_: None)
    return {"root": root, "source": source, "adapter": adapter, "target": target}


def _run(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _one_error_line(run: subprocess.CompletedProcess) -> str:
    lines = [x for x in run.stderr.splitlines() if x.strip()]
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-2000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------- serving export
def test_export_never_overwrites_the_users_own_files(made, tmp_path):
    serve = tmp_path / "serve"
    serve.mkdir()
    (serve / "export.json").write_text('{"mine": true}')
    (serve / "prompts-part-00000.safetensors").write_bytes(b"my own weights")
    run = _run("jobs/convert.py", "--export", made["target"], "--to", str(serve))
    line = _one_error_line(run)
    assert "did not write" in line and str(serve) in line
    assert (serve / "export.json").read_text() == '{"mine": true}'
    assert (serve / "prompts-part-00000.safetensors").read_bytes() == b"my own weights"


@pytest.mark.parametrize("where", ["target", "target/_progress", "target/shards", "adapter", "source/shards"])
def test_export_into_a_store_or_adapter_is_refused(made, where):
    folder = made["root"] / where
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(StoreError, match="export to a folder of its own"):
        export_for_serving(made["target"], str(folder))
    assert sorted(p.name for p in folder.iterdir()) == before


def test_export_rerun_replaces_only_its_own_files(made, tmp_path):
    serve = tmp_path / "serve"
    export_for_serving(made["target"], str(serve))
    export_for_serving(made["target"], str(serve), dtype="bfloat16")  # ours: replaced
    assert ServingPrompts(str(serve)).export["dtype"] == "bfloat16"
    (serve / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="notes.txt"):
        export_for_serving(made["target"], str(serve))
    assert (serve / "notes.txt").read_text() == "mine"


def test_export_prints_no_library_warning(made, tmp_path):
    run = _run("jobs/convert.py", "--export", made["target"], "--to", str(tmp_path / "serve"))
    assert run.returncode == 0, run.stderr
    assert "not writable" not in run.stderr and "Warning" not in run.stderr, run.stderr


# ---------------------------------------------------------------------------------------------- configs
BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"]
                 + [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")])


def test_yaml_alias_bomb_is_one_line_in_bounded_memory(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"selection:\n  strategy: random\n{BOMB}\ndata:\n  options:\n    x: *i\n")
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31)); "
              "sys.argv = ['migrate.py', '--config', sys.argv[1]]; import runpy; "
              "runpy.run_path('jobs/migrate.py', run_name='__main__')")
    run = _run("-c", script, str(path))
    line = _one_error_line(run)
    assert "alias" in line and str(path) in line and len(line) < 300
    with pytest.raises(ConfigError, match="aliases are expanded"):
        load_yaml(str(path))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 << 20  # KiB: this process stayed small


def test_binary_config_file_is_one_line(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 8)
    line = _one_error_line(_run("jobs/migrate.py", "--config", str(path)))
    assert str(path) in line and "not UTF-8" in line


def test_oversized_config_file_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("x: [" + "1, " * 600_000 + "1]\n")
    with pytest.raises(ConfigError, match="larger than"):
        load_yaml(str(path))


@pytest.mark.parametrize("override, message", [
    ("fit.lr=[unclosed", "not valid YAML"),
    ("fit.lr=!!python/object/apply:os.system ['echo pwned']", "not valid YAML"),
    ("fit.lr=" + "[" * 5000, "not valid YAML"),
])
def test_malformed_overrides_are_one_line(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        apply_overrides({}, [override])
    line = _one_error_line(_run("jobs/migrate.py", "--output", str(tmp_path / "o"), override))
    assert message in line and len(line) < 400 and "pwned" not in line.split("not valid YAML")[1]


def test_a_huge_value_is_shown_truncated_in_the_error():
    from puma_ray.config import ModelConfig, from_dict
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, {"name": ["x" * 10_000] * 1000}, "c.yaml model")
    assert len(str(e.value)) < 400


# ---------------------------------------------------------------------------------------------- ids
def _store_with_ids(made, tmp_path, ids: list) -> Path:
    """A copy of the source store whose first shard holds `ids` (written as raw bytes: invalid UTF-8 too)."""
    store = tmp_path / "store"
    shutil.copytree(made["source"], store)
    manifest = json.loads((store / "manifest.json").read_text())
    entry = manifest["shards"][0]
    table = pq.read_table(store / "shards" / entry["name"])
    raw = [i if isinstance(i, bytes) else i.encode() for i in ids]
    offsets = np.cumsum([0] + [len(r) for r in raw]).astype(np.int32)
    column = pa.Array.from_buffers(pa.string(), len(raw), [None, pa.py_buffer(offsets.tobytes()),
                                                           pa.py_buffer(b"".join(raw))])
    table = table.set_column(0, "user_id", column)
    pq.write_table(table, store / "shards" / entry["name"])
    entry["sha256"] = sha256_hex((store / "shards" / entry["name"]).read_bytes())
    (store / "manifest.json").write_text(json.dumps(manifest))
    return store


@pytest.mark.parametrize("bad, problem", [
    ("user00000000\x00", "control character"),  # numpy's fixed-width strings would drop the NUL: a collision
    (b"user\xff\xfe", "not valid UTF-8"),
    ("u" * 300, "longer than"),
    ("", "empty"),
])
def test_bad_user_ids_in_a_store_are_one_line_naming_shard_and_row(made, tmp_path, bad, problem):
    ids = ["user00000000", "user00000001", bad, "user00000003"]
    store = _store_with_ids(made, tmp_path, ids)
    with pytest.raises(StoreError, match=rf"shard part-00000.parquet: user id at row 2 .*{problem}"):
        PromptStore.open(str(store)).read_all()
    line = _one_error_line(_run("jobs/convert.py", "--adapter", made["adapter"], "--source", str(store),
                                "--output", str(tmp_path / "out"), "--engine", "local", "--no-progress"))
    assert "row 2" in line and problem in line
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_store_writer_refuses_a_nul_id_before_numpy_drops_it(tmp_path):
    writer = StoreWriter(str(tmp_path / "s"), synthetic_identity("m", D_S), L, {}, "rating")
    with pytest.raises(StoreError, match="row 1 holds a control character"):
        writer.write(["nul", "nul\x00"], np.zeros((2, L, D_S), np.float32))


def test_bad_ids_in_parquet_records_name_the_file_and_row(tmp_path):
    items = pa.table({"item_id": ["i1", "i2"], "text": ["a", "b"]})
    pq.write_table(items, tmp_path / "items.parquet")
    records = pa.table({"user_id": ["u1", "u\x002", "u3"], "item_id": ["i1", "i2", "i1"],
                        "label": pa.array([1.0, 2.0, 3.0], pa.float32()), "timestamp": [1, 2, 3],
                        "split": ["train", "train", "train"]})
    pq.write_table(records, tmp_path / "records.parquet")
    cfg = DataConfig(name="parquet", paths={"records": str(tmp_path / "records.parquet"),
                                            "items": str(tmp_path / "items.parquet")})
    with pytest.raises(DataError, match=r"records.parquet: user_id at row 1 holds a control character"):
        load_dataset(cfg)


# ---------------------------------------------------------------------------------------------- prompt scale
@pytest.mark.parametrize("factor", [1e6, 1e30])
def test_an_out_of_scale_prompt_is_rejected_with_its_reason(made, tmp_path, factor):
    ids, prompts = PromptStore.open(made["source"]).read_all()
    prompts[3] *= factor
    store = str(tmp_path / "scaled")
    writer = StoreWriter(store, PromptStore.open(made["source"]).identity, L, {}, "rating", shard_rows=SHARD)
    writer.write(ids, prompts)
    writer.write_head(*PromptStore.open(made["source"]).read_head())
    writer.close()
    summary = convert(made["adapter"], [store], str(tmp_path / "out"), ConvertConfig(progress=False),
                      log=lambda *_: None)
    assert summary["users"] == USERS - 1 and summary["rejected"] == 1
    (reason, count), = summary["rejected_by_reason"].items()
    assert "out of scale" in reason and count == 1
    rejects = pq.read_table(tmp_path / "out" / "rejects" / "part-00000.parquet").to_pylist()
    assert rejects == [{"user_id": str(ids[3]), "reason": reason}]
    # the others are converted exactly as from the clean store
    clean_ids, clean = PromptStore.open(made["target"]).read_all()
    out_ids, out = PromptStore.open(str(tmp_path / "out")).read_all()
    keep = clean_ids != ids[3]
    assert (out_ids == clean_ids[keep]).all() and np.array_equal(out, clean[keep])
    # the bound is the user's: 0 turns the check off (and is another conversion: its own output)
    off = convert(made["adapter"], [store], str(tmp_path / "off"), ConvertConfig(progress=False, max_prompt_scale=0),
                  log=lambda *_: None)
    assert off["rejected"] == (0 if factor == 1e6 else 1)  # 1e30 still overflows the adapter: non-finite

    joined = join_sources([PromptStore.open(store)])  # what a migration fits on: the outlier left out
    assert joined.out_of_scale == {store: [str(ids[3])]} and str(ids[3]) not in joined.users
