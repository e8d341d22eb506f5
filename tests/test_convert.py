"""Batch conversion: exactly once, resumable after a killed driver or actor, verified, on S3, bad input refused."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from puma_ray.artifacts.adapter_io import load_adapter
from puma_ray.artifacts.serving import ServingPrompts, export_for_serving
from puma_ray.artifacts.store import PromptStore, StoreError, prompts_table
from puma_ray.artifacts.verify import verify_store
from puma_ray.conversion.run import ConvertConfig, convert
from puma_ray.errors import AdapterError
from puma_ray.fs import StorageOptions
from puma_ray.tools.synthetic_prompts import write_synthetic_adapter, write_synthetic_store

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]
USERS, L, D_S, D_T, SHARD = 600, 2, 16, 48, 50  # 12 source shards; d_t = tiny:llama's width (serving test)
QUIET = ConvertConfig(progress=False)


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversion")
    return {"source": write_synthetic_store(str(root / "source"), USERS, L, D_S, SHARD),
            "adapter": write_synthetic_adapter(str(root / "adapter"), [D_S], D_T, L, hidden=32),
            "root": root}


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from puma_ray.ray_layer import ensure_ray
    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


def _expected(case) -> tuple[np.ndarray, np.ndarray]:
    ids, prompts = PromptStore.open(case["source"]).read_all()
    adapter = load_adapter(case["adapter"])[0]
    with torch.no_grad():
        return ids.astype(str), adapter(torch.from_numpy(prompts.copy())).numpy()


def _check_target(case, target: str, rejected: int = 0) -> None:
    """Every source user exactly once (converted or rejected), the right prompts, a verifiable manifest."""
    ids, prompts = PromptStore.open(target).read_all()  # refuses duplicates and a wrong count
    want_ids, want = _expected(case)
    assert len(ids) == USERS - rejected and set(ids.astype(str)) <= set(want_ids)
    pos = np.searchsorted(want_ids, ids.astype(str))
    np.testing.assert_allclose(prompts, want[pos], rtol=1e-5, atol=1e-6)
    summary = verify_store(target)
    assert summary["users"] + summary["rejected"] == USERS and summary["sources_checked"] == [case["source"]]


# ---------------------------------------------------------------------------------------------- in one process
def test_local_conversion_exactly_once_and_rerun_is_a_no_op(case, tmp_path):
    target = str(tmp_path / "target")
    summary = convert(case["adapter"], [case["source"]], target, QUIET, log=_quiet)
    assert summary["users"] == USERS and summary["rejected"] == 0 and summary["units_run"] == 12
    _check_target(case, target)
    manifest = PromptStore.open(target).manifest
    assert [e["name"] for e in manifest.shards] == [e["name"] for e in PromptStore.open(case["source"]).manifest.shards]
    assert manifest.lineage["kind"] == "migrated" and manifest.lineage["adapter"] == case["adapter"]
    assert manifest.lineage["conversion"]["adapter_sha256"]["adapter.safetensors"]
    assert manifest.identity.name == "synthetic-target" and manifest.hidden_size == D_T
    # the same command again: recognised as done, nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "target" / "shards").iterdir()}
    again = convert(case["adapter"], [case["source"]], target, QUIET, log=_quiet)
    assert again["units_run"] == 0 and again["users"] == USERS
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "target" / "shards").iterdir()}
    # another adapter into the same output: refused without overwrite, replaces it with
    other = write_synthetic_adapter(str(tmp_path / "other"), [D_S], D_T, L, hidden=32, seed=5)
    with pytest.raises(StoreError, match="already holds a store; pass overwrite"):
        convert(other, [case["source"]], target, QUIET, log=_quiet)
    convert(other, [case["source"]], target, ConvertConfig(progress=False, overwrite=True), log=_quiet)
    assert PromptStore.open(target).manifest.lineage["adapter"] == other


def test_non_finite_prompts_are_counted_rejects(case, source_copy, tmp_path):
    ids, _ = PromptStore.open(case["source"]).read_all()
    broken = ids[[3, 400]]  # two users whose source prompt is broken, as a buggy trainer would leave them
    _rewrite_shard(source_copy, lambda t_ids, t_p: (t_ids, np.where(np.isin(t_ids, broken)[:, None, None],
                                                                   np.float32(np.nan), t_p)), shards=None)
    source = source_copy
    target = str(tmp_path / "target")
    summary = convert(case["adapter"], [source], target, QUIET, log=_quiet)
    reason = f"non-finite prompt in source {source}"
    assert summary["users"] == USERS - 2 and summary["rejected"] == 2
    assert summary["rejected_by_reason"] == {reason: 2}
    assert verify_store(target)["rejected"] == 2
    files = PromptStore.open(target).manifest.lineage["rejects"]["files"]
    rows = [r for f in files for r in pq.read_table(f"{target}/rejects/{f['name']}").to_pylist()]
    assert sorted(r["user_id"] for r in rows) == sorted(broken.tolist())


def _rewrite_shard(store_path: str, edit, shards: list[int] | None = (0,), width: int | None = None):
    """Rewrites shards of a store with edit(ids, prompts) and re-records their checksums: a store whose bytes are
    consistent with its manifest but whose content is bad (what a buggy writer leaves)."""
    import hashlib
    manifest_path = Path(store_path) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    store = PromptStore.open(store_path)
    for i, entry in enumerate(manifest["shards"]):
        if shards is not None and i not in shards:
            continue
        ids, prompts = store.read_shard(entry, finite=False)
        ids, prompts = edit(ids, prompts)
        table = prompts_table(ids, prompts) if width is None else pa.table({
            "user_id": pa.array(ids.astype(str)),
            "prompt": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(len(ids) * width, np.float32)), width)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        (Path(store_path) / "shards" / entry["name"]).write_bytes(buf.getvalue())
        entry["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def source_copy(case, tmp_path):
    import shutil
    path = tmp_path / "source"
    shutil.copytree(case["source"], path)
    return str(path)


def _no_store(target: str) -> None:
    assert not os.path.exists(os.path.join(target, "manifest.json"))
    with pytest.raises(StoreError, match="no manifest.json"):
        PromptStore.open(target)


def test_wrong_width_shard_is_an_error_naming_the_shard(case, source_copy, tmp_path):
    _rewrite_shard(source_copy, lambda i, p: (i, p), shards=[7], width=L * D_S + 3)
    target = str(tmp_path / "target")
    with pytest.raises(StoreError, match=r"shard part-00007.parquet: prompt width 35 != l\*d = 32"):
        convert(case["adapter"], [source_copy], target, QUIET, log=_quiet)
    _no_store(target)


def test_corrupt_shard_is_an_error_naming_the_shard(case, source_copy, tmp_path):
    shard = Path(source_copy) / "shards" / "part-00004.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    target = str(tmp_path / "target")
    with pytest.raises(StoreError, match="shard part-00004.parquet: checksum mismatch"):
        convert(case["adapter"], [source_copy], target, QUIET, log=_quiet)
    _no_store(target)


def test_adapter_for_another_source_model_is_refused_before_writing(case, tmp_path):
    foreign = write_synthetic_adapter(str(tmp_path / "foreign"), [D_S], D_T, L, source_names=["another-model"])
    target = tmp_path / "target"
    with pytest.raises(AdapterError, match="adapter expects prompts of another-model"):
        convert(foreign, [case["source"]], str(target), QUIET, log=_quiet)
    assert not target.exists()
    # the command line: one clear line on stderr, exit 2
    proc = subprocess.run([sys.executable, "jobs/convert.py", "--adapter", foreign, "--source", case["source"],
                           "--output", str(target), "--engine", "local"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: adapter expects prompts of another-model")
    assert not target.exists()


# ---------------------------------------------------------------------------------------------- aggregated
def test_aggregated_conversion_with_missing_users(tmp_path):
    a = write_synthetic_store(str(tmp_path / "a"), 120, L, 8, 25, seed=1, model_name="synthetic-source-0")
    b_full = write_synthetic_store(str(tmp_path / "b-full"), 130, L, 12, 40, seed=2, model_name="synthetic-source-1")
    # b: lacks user 5 (in a), has users 120..129 (not in a)
    ids, prompts = PromptStore.open(b_full).read_all()
    keep = ids != "user00000005"
    state, head_cfg = PromptStore.open(b_full).read_head()
    m = PromptStore.open(b_full).manifest
    from puma_ray.artifacts.store import write_store
    b = str(tmp_path / "b")
    write_store(b, m.identity, ids[keep][::-1], prompts[keep][::-1], state, head_cfg, template=m.template,
                task="rating", shard_rows=40)  # another order and shard layout than a's
    adapter_path = write_synthetic_adapter(str(tmp_path / "ad"), [8, 12], 20, L, hidden=16)
    with pytest.raises(StoreError, match=rf"user 'user00000120' is missing from source store {a}"):
        convert(adapter_path, [a, b], str(tmp_path / "t-error"), QUIET, log=_quiet)
    assert not (tmp_path / "t-error").exists()

    target = str(tmp_path / "t")
    cfg = ConvertConfig(progress=False, missing_policy="reject")
    summary = convert(adapter_path, [a, b], target, cfg, log=_quiet)
    assert summary["users"] == 119 and summary["rejected"] == 11
    assert summary["rejected_by_reason"] == {f"missing from source {b}": 1, f"missing from source {a}": 10}
    assert verify_store(target)["sources_checked"] == [a, b]
    # the converted prompts are the adapter applied to both sources' prompts of the same user
    out_ids, out = PromptStore.open(target).read_all()
    a_ids, a_p = PromptStore.open(a).read_all()
    b_ids, b_p = PromptStore.open(b).read_all()
    adapter = load_adapter(adapter_path)[0]
    with torch.no_grad():
        want = adapter(torch.from_numpy(a_p[np.searchsorted(a_ids, out_ids)].copy()),
                       torch.from_numpy(b_p[np.searchsorted(b_ids, out_ids)].copy())).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- verify + export
def test_verify_finds_tampering(case, tmp_path):
    target = str(tmp_path / "target")
    convert(case["adapter"], [case["source"]], target, QUIET, log=_quiet)
    ok = subprocess.run([sys.executable, "jobs/convert.py", "--verify", target], cwd=ROOT, capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "verify ok" in ok.stdout
    # a shard dropped from the manifest (its users vanish): the source user set no longer matches
    manifest_path = Path(target) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    gone = manifest["shards"].pop(3)
    manifest["num_users"] -= gone["rows"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"shards/part-00003.parquet is not listed in its manifest.json"):
        verify_store(target)  # the folder holds a shard the manifest no longer lists
    (Path(target) / "shards" / gone["name"]).unlink()
    with pytest.raises(StoreError, match=r"source user 'user00000150' is neither converted nor rejected \(50 "):
        verify_store(target)  # and without it, its users are missing
    bad = subprocess.run([sys.executable, "jobs/convert.py", "--verify", target], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "verify FAILED" in bad.stderr
    # a shard's bytes changed after the manifest
    shard = Path(target) / "shards" / manifest["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(StoreError, match="part-00000.parquet: checksum mismatch"):
        verify_store(target)


def test_serving_export_feeds_the_model(case, tmp_path, tiny_model):
    target = str(tmp_path / "target")
    convert(case["adapter"], [case["source"]], target, QUIET, log=_quiet)
    export = export_for_serving(target, str(tmp_path / "serve"))
    assert export["users"] == USERS and export["model"]["name"] == "synthetic-target"
    served = ServingPrompts(str(tmp_path / "serve"))
    ids, prompts = PromptStore.open(target).read_all()
    assert sorted(served.users) == ids.astype(str).tolist()
    for i in (0, 123, USERS - 1):
        torch.testing.assert_close(served.get(str(ids[i])), torch.from_numpy(prompts[i]), rtol=0, atol=0)
    # what an inference server does with it: prompt_embeds in front of the token embeddings
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama")).eval()
    tokens = model.get_input_embeddings()(torch.tensor([[5, 6, 7]]))
    embeds = torch.cat([served.batch([str(ids[0])]), tokens], dim=1)
    with torch.no_grad():
        logits = model(inputs_embeds=embeds).logits
    assert logits.shape[:2] == (1, L + 3) and torch.isfinite(logits).all()
    with pytest.raises(KeyError, match="nobody"):
        served.get("nobody")


# ---------------------------------------------------------------------------------------------- on Ray
def test_ray_actor_pool_matches_local(case, tmp_path, local_ray):
    from puma_ray.ray_layer import run_on_ray
    target = str(tmp_path / "target")
    summary = convert(case["adapter"], [case["source"]], target, QUIET, runner=run_on_ray, log=_quiet)
    assert summary["users"] == USERS and summary["units_run"] == 12
    _check_target(case, target)


def _kill_first_pid(pid_dir: Path, killed: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        pids = sorted(pid_dir.glob("*.pid"))
        if pids:
            pid = int(pids[0].read_text())
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
            return
        time.sleep(0.05)


# the killed driver's resume and the lost node stay in the default run
@pytest.mark.slow
def test_killed_actor_is_retried_by_ray(case, tmp_path, local_ray, monkeypatch):
    """One pool actor SIGKILLed mid-run: Ray restarts it and retries its unit; the user sees a complete store."""
    import ray

    from puma_ray.ray_layer import run_on_ray
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    # the hooks reach the actors through the environment only for workers started after this point
    ray.shutdown()
    monkeypatch.setenv("PUMA_CONVERT_PID_DIR", str(pid_dir))
    monkeypatch.setenv("PUMA_CONVERT_UNIT_DELAY_S", "0.3")
    from puma_ray.ray_layer import ensure_ray
    ensure_ray(num_cpus=2)
    killed, stop = {}, threading.Event()
    killer = threading.Thread(target=_kill_first_pid, args=(pid_dir, killed, stop), daemon=True)
    killer.start()
    target = str(tmp_path / "target")
    try:
        summary = convert(case["adapter"], [case["source"]], target, QUIET, runner=run_on_ray, log=_quiet)
    finally:
        stop.set()
        ray.shutdown()
    assert killed, "no actor was killed: the test did not test anything"
    assert summary["users"] == USERS
    _check_target(case, target)


def test_killed_driver_resumes_without_redoing_shards(case, tmp_path):
    """jobs/convert.py (its own local Ray) SIGKILLed with its process group after some shards; the same command
    again finishes: completed shards untouched, every user once, the manifest verifies."""
    target = tmp_path / "target"
    cmd = [sys.executable, "jobs/convert.py", "--adapter", case["adapter"], "--source", case["source"],
           "--output", str(target), "--actors", "1", "--no-progress"]
    env = {**os.environ, "PUMA_CONVERT_UNIT_DELAY_S": "1.0", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            done = list((target / "_progress").glob("*.json")) if (target / "_progress").exists() else []
            if len(done) >= 3:
                break
            time.sleep(0.1)
    finally:  # the driver, its local Ray and the pool actors (some leave the process group): all of them
        import psutil
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, out  # killed, not finished
    assert not (target / "manifest.json").exists()
    done = {p.stem: (target / "shards" / p.stem).stat().st_mtime_ns for p in (target / "_progress").glob("*.json")}
    assert 3 <= len(done) < 12
    rerun = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming: {len(done)} of 12 unit(s) already converted" in rerun.stdout
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["units_run"] == 12 - len(done) and summary["users"] == USERS
    assert done == {name: (target / "shards" / name).stat().st_mtime_ns for name in done}  # not rewritten
    _check_target(case, str(target))


# ---------------------------------------------------------------------------------------------- S3
def test_convert_from_and_to_s3(s3_server, tmp_path, local_ray):
    from puma_ray.ray_layer import run_on_ray
    storage = StorageOptions(endpoint_url=s3_server["endpoint_url"], key=s3_server["key"],
                             secret=s3_server["secret"], region="us-east-1")
    prefix = f"s3://{s3_server['bucket']}/convert/{uuid.uuid4().hex[:8]}"
    source = write_synthetic_store(f"{prefix}/source", 90, L, D_S, 40, storage=storage)
    adapter = write_synthetic_adapter(f"{prefix}/adapter", [D_S], D_T, L, hidden=32, storage=storage)
    summary = convert(adapter, [source], f"{prefix}/target", QUIET, storage, runner=run_on_ray, log=_quiet)
    assert summary["users"] == 90 and summary["units"] == 3
    assert verify_store(f"{prefix}/target", storage=storage)["sources_checked"] == [source]
    ids, prompts = PromptStore.open(f"{prefix}/target", storage).read_all()
    _, src = PromptStore.open(source, storage).read_all()
    with torch.no_grad():
        want = load_adapter(adapter, storage)[0](torch.from_numpy(src.copy())).numpy()
    np.testing.assert_allclose(prompts, want, rtol=1e-5, atol=1e-6)
