"""Artifacts are input: a name read from a manifest, progress record or export never leaves its folder."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from puma_ray.artifacts.serving import ServingPrompts, export_for_serving
from puma_ray.artifacts.store import PromptStore, StoreError
from puma_ray.artifacts.verify import verify_store
from puma_ray.conversion.run import ConvertConfig, convert
from puma_ray.fs import child, plain_name
from puma_ray.tools.synthetic_prompts import write_synthetic_adapter, write_synthetic_store

ROOT = Path(__file__).resolve().parents[1]
USERS, L, D_S, D_T, SHARD = 60, 1, 8, 16, 20


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    return {"source": write_synthetic_store(str(root / "source"), USERS, L, D_S, SHARD),
            "adapter": write_synthetic_adapter(str(root / "adapter"), [D_S], D_T, L, hidden=16)}


@pytest.mark.parametrize("name", ["../escape.parquet", "/etc/passwd", "a/b.parquet", "..", ".", "", "a\\b",
                                  " x", "x\n", None, 3])
def test_plain_name_refuses_anything_but_a_file_name(name):
    with pytest.raises(StoreError, match="is not a plain file name"):
        plain_name(name, "store s manifest.json shards", StoreError)
    with pytest.raises(StoreError, match="store s manifest.json shards"):
        child("s3://bucket/store/shards", name, "store s manifest.json shards", StoreError)


def test_plain_names_pass():
    assert child("s3://bucket/store/shards", "part-00001.parquet", "x") == "s3://bucket/store/shards/part-00001.parquet"
    assert plain_name("prompts-part-00001.safetensors", "x") == "prompts-part-00001.safetensors"


def _escaping_source(made, tmp_path) -> tuple[Path, Path]:
    """A copy of the source store whose manifest names a shard one level up, where a real shard file waits: a
    reader that joined the name would find valid data there, outside the store."""
    source = tmp_path / "shared" / "source"
    shutil.copytree(made["source"], source)
    manifest = json.loads((source / "manifest.json").read_text())
    first = manifest["shards"][0]["name"]
    shutil.copy(source / "shards" / first, tmp_path / "shared" / "escape.parquet")
    manifest["shards"][0]["name"] = "../../escape.parquet"
    (source / "manifest.json").write_text(json.dumps(manifest))
    return source, tmp_path / "shared"


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_escaping_shard_name_refused_on_open_verify_and_convert(made, tmp_path):
    source, shared = _escaping_source(made, tmp_path)
    with pytest.raises(StoreError, match=r"shards: '\.\./\.\./escape\.parquet' is not a plain file name"):
        PromptStore.open(str(source))
    with pytest.raises(StoreError, match="is not a plain file name"):
        verify_store(str(source))
    before = _files(shared)
    output = shared / "target"
    with pytest.raises(StoreError, match="is not a plain file name"):
        convert(made["adapter"], [str(source)], str(output), ConvertConfig(progress=False), log=lambda *_: None)
    assert _files(shared) == before  # nothing written anywhere, the output folder not even created

    verify = subprocess.run([sys.executable, "jobs/convert.py", "--verify", str(source)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 1 and "verify ok" not in verify.stdout
    assert verify.stderr.strip().splitlines()[-1].startswith("verify FAILED") and "plain file name" in verify.stderr
    run = subprocess.run([sys.executable, "jobs/convert.py", "--adapter", made["adapter"], "--source", str(source),
                          "--output", str(output), "--engine", "local", "--no-progress"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    lines = [x for x in run.stderr.splitlines() if x.strip()]
    assert run.returncode == 2 and lines[-1].startswith("error: ") and "plain file name" in lines[-1], run.stderr
    assert "Traceback" not in run.stderr
    assert _files(shared) == before


def test_escaping_rejects_name_refused_by_verify(made, tmp_path):
    target = tmp_path / "target"
    convert(made["adapter"], [made["source"]], str(target), ConvertConfig(progress=False), log=lambda *_: None)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["lineage"].setdefault("rejects", {})["files"] = [{"name": "../../../etc/hosts", "rows": 1,
                                                               "sha256": "0" * 64}]
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"lineage.rejects.files: '\.\./\.\./\.\./etc/hosts' is not a plain"):
        verify_store(str(target))


def test_escaping_export_file_refused(made, tmp_path):
    target, serve = tmp_path / "target", tmp_path / "serve"
    convert(made["adapter"], [made["source"]], str(target), ConvertConfig(progress=False), log=lambda *_: None)
    export_for_serving(str(target), str(serve))
    assert len(ServingPrompts(str(serve)).users) == USERS
    export = json.loads((serve / "export.json").read_text())
    export["files"][0]["file"] = "../target/shards/" + export["files"][0]["file"]
    (serve / "export.json").write_text(json.dumps(export))
    with pytest.raises(StoreError, match="is not a plain file name"):
        ServingPrompts(str(serve))


# ---------------------------------------------------------------------------------------------- no secrets written
PLANTED = ["PLANTED-KEY-1234", "PLANTED-SECRET-5678", "PLANTED-URL-PASS-90", "PLANTED-ENV-SECRET-42"]


def _scan(folder: Path, *texts: str) -> list[str]:
    """Every planted secret found in any file under `folder` or in the given texts (console output)."""
    found = []
    for path in [p for p in folder.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        found += [f"{path.relative_to(folder)}: {s}" for s in PLANTED if s.encode() in data]
    found += [f"console: {s}" for text in texts for s in PLANTED if s in text]
    return found


def test_migrate_and_convert_write_no_secret(toy_dataset, tmp_path):
    import os

    import yaml

    from puma_ray.data import save_dataset
    paths = save_dataset(toy_dataset, str(tmp_path / "data"))
    config = {"sources": [{"store": "{output}/source-store", "model": {"name": "tiny:llama"},
                           "prepare": {"epochs": 1, "batch_size": 64}}],
              "target": {"name": "tiny:qwen2"},
              "data": {"name": "parquet", "paths": {"records": paths["records"], "items": paths["items"]}},
              "selection": {"k": 3, "budget": 8, "valid_users": 5}, "fit": {"epochs": 1, "batch_size": 64},
              "baselines": {"linear": False, "random_init": False}, "engine": {"kind": "local"},
              "convert": {"runs_on": "local"}, "threads": 1,
              "storage": {"key": PLANTED[0], "secret": PLANTED[1],
                          "endpoint_url": f"http://planted-user:{PLANTED[2]}@127.0.0.1:9"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": PLANTED[3]}
    migrate = subprocess.run([sys.executable, "jobs/migrate.py", "--config", str(tmp_path / "job.yaml"),
                              "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    # redacted, not dropped: a reader sees that one was set
    assert report["provenance"]["config"]["storage"]["key"] == "***"
    assert report["provenance"]["config"]["storage"]["endpoint_url"] == "http://***@127.0.0.1:9"
    convert_out = tmp_path / "converted"
    converted = subprocess.run([sys.executable, "jobs/convert.py", "--adapter", str(out / "adapter"), "--source",
                                str(out / "source-store"), "--output", str(convert_out), "--engine", "local",
                                "--no-progress", "--endpoint-url", f"http://u:{PLANTED[2]}@127.0.0.1:9"],
                               cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert len(list(out.rglob("*"))) > 10 and (convert_out / "manifest.json").exists()  # the scan saw real outputs
    leaks = _scan(tmp_path, migrate.stdout, migrate.stderr, converted.stdout, converted.stderr)
    leaks = [x for x in leaks if not x.startswith("job.yaml")]  # the user's own config file holds them, of course
    assert not leaks, leaks


# ---------------------------------------------------------------------------------------------- never delete theirs
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_may_not_be_in_or_around_a_source_or_the_adapter(made, tmp_path, overwrite):
    import shutil as sh
    source, adapter = tmp_path / "source", tmp_path / "adapter"
    sh.copytree(made["source"], source)
    sh.copytree(made["adapter"], adapter)
    before = _snapshot(tmp_path)
    cfg = ConvertConfig(progress=False, overwrite=overwrite)
    for output, relation in [(source, "is the source store"), (source / "sub", "is inside the source store"),
                             (tmp_path, "contains the source store"), (adapter, "is the adapter"),
                             (adapter / "x", "is inside the adapter")]:
        with pytest.raises(StoreError, match=f"output {output} {relation}"):
            convert(str(adapter), [str(source)], str(output), cfg, log=lambda *_: None)
    assert _snapshot(tmp_path) == before  # source, adapter and its head untouched


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_ours_is_refused_and_kept(made, tmp_path, overwrite):
    output = tmp_path / "theirs"
    for name, data in [("rejects/keep.parquet", b"theirs"), ("_progress/notes.json", b"{}"),
                       ("head.safetensors", b"their head"), ("report.txt", b"hello")]:
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_bytes(data)
    before = _snapshot(output)
    with pytest.raises(StoreError, match="holds files puma_ray did not write there"):
        convert(made["adapter"], [made["source"]], str(output), ConvertConfig(progress=False, overwrite=overwrite),
                log=lambda *_: None)
    assert _snapshot(output) == before


def test_overwrite_removes_only_what_our_state_lists(made, tmp_path):
    output = tmp_path / "target"
    convert(made["adapter"], [made["source"]], str(output), ConvertConfig(progress=False), log=lambda *_: None)
    planted = output / "shards" / "someone-elses.parquet"
    planted.write_bytes(b"not ours")
    with pytest.raises(StoreError, match="someone-elses.parquet, which its conversion state does not name"):
        convert(made["adapter"], [made["source"]], str(output), ConvertConfig(progress=False, overwrite=True),
                log=lambda *_: None)
    assert planted.read_bytes() == b"not ours" and (output / "manifest.json").exists()  # nothing removed
    planted.unlink()
    convert(made["adapter"], [made["source"]], str(output), ConvertConfig(progress=False, overwrite=True),
            log=lambda *_: None)
    assert verify_store(str(output), [made["source"]])["users"] == USERS


def test_convert_job_refuses_output_equal_to_source_even_with_overwrite(made, tmp_path):
    import shutil as sh
    source = tmp_path / "source"
    sh.copytree(made["source"], source)
    before = _snapshot(source)
    run = subprocess.run([sys.executable, "jobs/convert.py", "--adapter", made["adapter"], "--source", str(source),
                          "--output", str(source), "--engine", "local", "--overwrite", "--no-progress"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    lines = [x for x in run.stderr.splitlines() if x.strip()]
    assert run.returncode == 2 and lines[-1].startswith("error: output") and "is the source store" in lines[-1]
    assert _snapshot(source) == before


# ---------------------------------------------------------------------------------------------- verify everything
def _store_of(tmp_path, store_inputs, identity=None) -> Path:
    from puma_ray.artifacts.store import write_store
    s = store_inputs
    path = tmp_path / "store"
    write_store(str(path), identity or s.identity, s.user_ids, s.prompts, s.head_state, s.head_config,
                template=s.template, task=s.task, lineage=s.lineage)
    return path


def test_verify_checks_the_head(tmp_path, store_inputs):
    path = _store_of(tmp_path, store_inputs)
    assert verify_store(str(path))["users"] == 11
    (path / "head.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(StoreError, match="head.safetensors: checksum mismatch"):
        verify_store(str(path))


def test_verify_refuses_files_the_manifest_does_not_list(tmp_path, store_inputs):
    path = _store_of(tmp_path, store_inputs)
    shard = next((path / "shards").iterdir())
    (path / "shards" / "extra.parquet").write_bytes(shard.read_bytes())
    with pytest.raises(StoreError, match="shards/extra.parquet is not listed in its manifest.json"):
        verify_store(str(path))
    (path / "shards" / "extra.parquet").unlink()
    shard.unlink()
    with pytest.raises(StoreError, match=f"shards/{shard.name} is listed in its manifest.json but missing"):
        verify_store(str(path))


def test_verify_with_a_model_checks_the_fingerprint(tmp_path, store_inputs):
    import numpy as np

    from puma_ray.models.backbone import load_backbone
    real = load_backbone("tiny:llama").identity
    store_inputs.prompts = np.zeros((len(store_inputs.user_ids), store_inputs.l, real.hidden_size), np.float32)
    path = _store_of(tmp_path, store_inputs, identity=real)
    assert verify_store(str(path), model="tiny:llama")["model_checked"] == "tiny:llama"
    with pytest.raises(StoreError, match="its prompts mean nothing to another model"):
        verify_store(str(path), model="tiny:qwen2")
    proc = subprocess.run([sys.executable, "jobs/convert.py", "--verify", str(path), "--model", "tiny:qwen2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("verify FAILED: store")


# ---------------------------------------------------------------------------------------------- clean failures
def test_a_write_failure_is_one_line_and_the_rerun_recovers(made, tmp_path):
    """A file size limit stands in for a full disk: one line naming the file and the cause, exit 2, no manifest;
    the same command without the limit then completes the store."""
    import resource

    def small_files():  # the adapter (~13 KB) and the source shards (~7 KB) fit, a target shard (~52 KB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    source = write_synthetic_store(str(tmp_path / "source"), 200, 1, 8, 200)
    adapter = write_synthetic_adapter(str(tmp_path / "adapter"), [8], 64, 1, hidden=8)
    output = tmp_path / "target"
    cmd = [sys.executable, "jobs/convert.py", "--adapter", adapter, "--source", source,
           "--output", str(output), "--engine", "local", "--no-progress"]
    failed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    lines = [x for x in failed.stderr.splitlines() if x.strip()]
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot use {output}/shards/") and "too large" in lines[0]
    assert not (output / "manifest.json").exists()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert verify_store(str(output), [source])["users"] == 200


def test_verify_exit_code_matches_its_last_line(made, tmp_path):
    """`verify ok` always exits 0, `verify FAILED` always 1: ten runs, no abort at interpreter exit (134)."""
    target = tmp_path / "target"
    convert(made["adapter"], [made["source"]], str(target), ConvertConfig(progress=False), log=lambda *_: None)
    for _ in range(10):
        proc = subprocess.run([sys.executable, "jobs/convert.py", "--verify", str(target)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout.startswith("verify ok"), (proc.returncode, proc.stderr[-500:])


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_garbage_adapter_is_one_line_before_anything_is_written(made, tmp_path, engine):
    import shutil as sh
    adapter = tmp_path / "adapter"
    sh.copytree(made["adapter"], adapter)
    (adapter / "adapter.safetensors").write_bytes(b"\x00" * 64)
    output = tmp_path / "target"
    run = subprocess.run([sys.executable, "jobs/convert.py", "--adapter", str(adapter), "--source", made["source"],
                          "--output", str(output), "--engine", engine, "--no-progress"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    lines = [x for x in run.stderr.splitlines() if x.strip()]
    assert run.returncode == 2, run.stderr[-2000:]
    assert lines[-1] == f"error: adapter {adapter}: adapter.safetensors is not a valid safetensors file"
    assert "Traceback" not in run.stderr
    assert not output.exists()


def test_adapter_of_another_width_is_refused(made, tmp_path):
    other = write_synthetic_store(str(tmp_path / "wide"), 20, L, D_S + 4, SHARD)
    from puma_ray.errors import AdapterError
    with pytest.raises(AdapterError, match=r"maps prompts of width\(s\) \[8\]; the source store\(s\) hold width"):
        convert(made["adapter"], [other], str(tmp_path / "t"), ConvertConfig(progress=False), log=lambda *_: None)
