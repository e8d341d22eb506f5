"""The personalization store on a local folder: round trip, manifest contents, and every refused case."""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from puma_ray.artifacts.store import (
    FORMAT_VERSION,
    HEAD,
    MANIFEST,
    SHARD_DIR,
    PromptStore,
    StoreError,
    StoreWriter,
    prompts_table,
    write_store,
)


def _write(s, path, user_ids=None, prompts=None, **kwargs):
    kwargs.setdefault("shard_rows", 4)
    return write_store(str(path), s.identity, s.user_ids if user_ids is None else user_ids,
                       s.prompts if prompts is None else prompts, s.head_state, s.head_config,
                       template=s.template, task=s.task, lineage=s.lineage, provenance=s.provenance, **kwargs)


def _shard_files(path) -> list[str]:
    return sorted(os.listdir(os.path.join(path, SHARD_DIR)))


def _load_manifest(path) -> dict:
    with open(os.path.join(path, MANIFEST)) as f:
        return json.load(f)


def _save_manifest(path, raw: dict) -> None:
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(raw, f)


# ------------------------------------------------------------------------------------------------ round trip
def test_round_trip_several_shards(tmp_path, store_inputs):
    s, path = store_inputs, tmp_path / "store"
    manifest = _write(s, path, shard_rows=4)
    assert _shard_files(path) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [e["rows"] for e in manifest.shards] == [4, 4, 3]

    store = PromptStore.open(str(path))
    assert store.prompt_shape == (s.l, s.d)
    assert store.identity == s.identity
    ids, prompts = store.read_all()
    order = np.argsort(s.user_ids)
    assert ids.tolist() == sorted(s.user_ids.tolist())
    np.testing.assert_array_equal(prompts, s.prompts[order])  # float32 stored bit-exactly
    assert prompts.dtype == np.float32 and prompts.shape == (len(s.user_ids), s.l, s.d)

    # shards stream in manifest order and each keeps its own rows
    parts = list(store.iter_shards())
    assert [len(p[0]) for p in parts] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), s.prompts)

    state, config = store.read_head()
    assert config == s.head_config
    assert state.keys() == s.head_state.keys()
    for k, v in s.head_state.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    store.check_model(s.identity)  # the store's own model is accepted


def test_manifest_fields(tmp_path, store_inputs):
    s, path = store_inputs, tmp_path / "store"
    _write(s, path, shard_rows=5)
    raw = _load_manifest(path)
    assert raw["format_version"] == FORMAT_VERSION
    assert raw["model"] == asdict(s.identity)
    assert raw["model"]["fingerprint"] == s.identity.fingerprint
    assert raw["prompt_length"] == s.l and raw["hidden_size"] == s.d
    assert raw["template"] == s.template and raw["task"] == "rating"
    assert raw["num_users"] == len(s.user_ids)
    assert raw["lineage"] == s.lineage and raw["provenance"] == s.provenance
    assert raw["created_at"] and raw["created_by"].startswith("puma_ray")
    assert [e["rows"] for e in raw["shards"]] == [5, 5, 1]
    for entry in raw["shards"]:  # every shard's checksum is of the bytes on disk
        data = (path / SHARD_DIR / entry["name"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        table = pq.read_table(io.BytesIO(data))
        assert table.schema.field("user_id").type == pa.string()
        assert table.schema.field("prompt").type == pa.list_(pa.float32(), s.l * s.d)
    # the head file carries the model it belongs to
    assert (path / HEAD).exists()


def test_writer_in_several_calls(tmp_path, store_inputs):
    """StoreWriter used directly: several write() calls make more shards; the manifest counts all users."""
    s, path = store_inputs, tmp_path / "store"
    w = StoreWriter(str(path), s.identity, s.l, s.template, s.task, shard_rows=100)
    w.write(s.user_ids[:6], s.prompts[:6])
    w.write(s.user_ids[6:], s.prompts[6:])
    w.write_head(s.head_state, s.head_config)
    manifest = w.close()
    assert manifest.num_users == len(s.user_ids) and [e["rows"] for e in manifest.shards] == [6, 5]
    ids, _ = PromptStore.open(str(path)).read_all()
    assert ids.tolist() == sorted(s.user_ids.tolist())


# ------------------------------------------------------------------------------------------------ refused on read
def test_wrong_model_refused_naming_both(tmp_path, store_inputs):
    s, path = store_inputs, tmp_path / "store"
    _write(s, path)
    store = PromptStore.open(str(path))
    other = replace(s.identity, name="tiny:qwen2", family="qwen2", fingerprint="cd" * 32)
    with pytest.raises(StoreError, match=r"belongs to model tiny:llama .*fingerprint abababababab.*not to "
                                         r"tiny:qwen2 .*fingerprint cdcdcdcdcdcd") as err:
        store.check_model(other)
    assert str(path) in str(err.value)
    # same name, retrained weights: still refused (the fingerprint is what binds)
    with pytest.raises(StoreError, match="prompts mean nothing to another model"):
        store.check_model(replace(s.identity, fingerprint="ef" * 32))


def test_missing_manifest_is_incomplete(tmp_path, store_inputs):
    s, path = store_inputs, tmp_path / "store"
    w = StoreWriter(str(path), s.identity, s.l, s.template, s.task, shard_rows=4)
    w.write(s.user_ids, s.prompts)
    w.write_head(s.head_state, s.head_config)  # ... and the process dies before close()
    assert _shard_files(path) and not (path / MANIFEST).exists()
    with pytest.raises(StoreError, match=rf"has no {MANIFEST} \(incomplete"):
        PromptStore.open(str(path))


def test_not_a_path_refused(tmp_path):
    with pytest.raises(StoreError, match=rf"no {MANIFEST} \(no such path\)"):
        PromptStore.open(str(tmp_path / "nowhere"))


def test_close_without_head_refused(tmp_path, store_inputs):
    s, path = store_inputs, tmp_path / "store"
    w = StoreWriter(str(path), s.identity, s.l, s.template, s.task)
    w.write(s.user_ids, s.prompts)
    with pytest.raises(StoreError, match="task head was not written"):
        w.close()
    assert not (path / MANIFEST).exists()


def test_modified_shard_fails_checksum(tmp_path, store_inputs):
    s, path = store_inputs, tmp_path / "store"
    _write(s, path, shard_rows=4)
    shard = path / SHARD_DIR / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = PromptStore.open(str(path))  # opening reads only the manifest
    store.read_shard(store.manifest.shards[0])  # the untouched shard still reads
    with pytest.raises(StoreError, match="shard part-00001.parquet: checksum mismatch"):
        store.read_all()


def test_missing_shard_refused(tmp_path, store_inputs):
    s, path = store_inputs, tmp_path / "store"
    _write(s, path, shard_rows=4)
    (path / SHARD_DIR / "part-00002.parquet").unlink()
    with pytest.raises(StoreError, match="shard part-00002.parquet: missing"):
        PromptStore.open(str(path)).read_all()


def test_wrong_width_shard_refused(tmp_path, store_inputs):
    """A well-formed shard whose prompts are l*d' wide, its checksum patched in: only the width check can catch it."""
    s, path = store_inputs, tmp_path / "store"
    _write(s, path, shard_rows=4)
    wide = s.l * s.d + 3
    values = pa.array(np.zeros(4 * wide, np.float32))
    table = pa.table({"user_id": pa.array(["x0", "x1", "x2", "x3"]),
                      "prompt": pa.FixedSizeListArray.from_arrays(values, wide)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    (path / SHARD_DIR / "part-00000.parquet").write_bytes(buf.getvalue())
    raw = _load_manifest(path)
    raw["shards"][0]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    _save_manifest(path, raw)
    with pytest.raises(StoreError, match=rf"part-00000.parquet: prompt width {wide} != l\*d = {s.l * s.d}"):
        PromptStore.open(str(path)).read_all()


def test_row_count_and_user_count_checked(tmp_path, store_inputs):
    s, path = store_inputs, tmp_path / "store"
    _write(s, path, shard_rows=4)
    raw = _load_manifest(path)
    raw["shards"][1]["rows"] = 5
    _save_manifest(path, raw)
    with pytest.raises(StoreError, match="part-00001.parquet: 4 rows, manifest says 5"):
        PromptStore.open(str(path)).read_all()
    raw["shards"][1]["rows"] = 4
    raw["num_users"] = 12
    _save_manifest(path, raw)
    with pytest.raises(StoreError, match="11 users in shards, manifest says 12"):
        PromptStore.open(str(path)).read_all()


def test_duplicate_user_across_shards_refused_on_read(tmp_path, store_inputs):
    """A shard replaced (checksum patched) by one repeating a user of another shard: read_all names the user."""
    s, path = store_inputs, tmp_path / "store"
    _write(s, path, shard_rows=4)
    store = PromptStore.open(str(path))
    ids0, _ = store.read_shard(store.manifest.shards[0])
    ids1, prompts1 = store.read_shard(store.manifest.shards[1])
    ids1 = ids1.copy()
    ids1[2] = ids0[1]
    buf = io.BytesIO()
    pq.write_table(prompts_table(ids1, prompts1), buf)
    (path / SHARD_DIR / "part-00001.parquet").write_bytes(buf.getvalue())
    raw = _load_manifest(path)
    raw["shards"][1]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    _save_manifest(path, raw)
    with pytest.raises(StoreError, match=rf"user '{ids0[1]}' appears more than once"):
        PromptStore.open(str(path)).read_all()


def test_unreadable_and_newer_manifest_refused(tmp_path, store_inputs):
    s, path = store_inputs, tmp_path / "store"
    _write(s, path)
    raw = _load_manifest(path)
    _save_manifest(path, {**raw, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(StoreError, match=f"format {FORMAT_VERSION + 1} is newer"):
        PromptStore.open(str(path))
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError, match=f"unreadable {MANIFEST}"):
        PromptStore.open(str(path))


# ------------------------------------------------------------------------------------------------ refused on write
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_prompt_refused_naming_user(tmp_path, store_inputs, bad):
    s, path = store_inputs, tmp_path / "store"
    prompts = s.prompts.copy()
    prompts[7, 1, 3] = bad
    with pytest.raises(StoreError, match=rf"non-finite prompt for user '{s.user_ids[7]}' \(1 user"):
        _write(s, path, prompts=prompts, shard_rows=100)
    assert not (path / MANIFEST).exists()


def test_wrong_prompt_shape_refused(tmp_path, store_inputs):
    s, path = store_inputs, tmp_path / "store"
    w = StoreWriter(str(path), s.identity, s.l, s.template, s.task)
    with pytest.raises(StoreError, match=r"prompts of shape \(2, 7\) do not match \(l=2, d=8\)"):
        w.write(s.user_ids, s.prompts[:, :, :7])


def test_duplicate_user_within_a_shard_refused(tmp_path, store_inputs):
    s, path = store_inputs, tmp_path / "store"
    ids = s.user_ids.copy()
    ids[3] = ids[1]
    with pytest.raises(StoreError, match=rf"user '{ids[1]}' written twice"):
        _write(s, path, user_ids=ids, shard_rows=100)


def test_duplicate_user_across_shards_refused(tmp_path, store_inputs):
    s, path = store_inputs, tmp_path / "store"
    ids = s.user_ids.copy()
    ids[9] = ids[0]  # shard 0 holds rows 0-3, shard 2 rows 8-10
    with pytest.raises(StoreError, match=rf"user '{ids[0]}' written twice"):
        _write(s, path, user_ids=ids, shard_rows=4)
    assert not (path / MANIFEST).exists()  # refused before the manifest: the store reads as incomplete
    # and across two write() calls of one writer: refused when it closes, before the manifest
    w = StoreWriter(str(tmp_path / "other"), s.identity, s.l, s.template, s.task)
    w.write(s.user_ids[:5], s.prompts[:5])
    w.write(s.user_ids[4:], s.prompts[4:])
    w.write_head(s.head_state, s.head_config)
    with pytest.raises(StoreError, match=rf"user '{s.user_ids[4]}' written twice"):
        w.close()
    assert not (tmp_path / "other" / MANIFEST).exists()


def test_overwrite(tmp_path, store_inputs):
    s, path = store_inputs, tmp_path / "store"
    _write(s, path, shard_rows=4)  # 3 shards
    with pytest.raises(StoreError, match="already exists.*overwrite"):
        _write(s, path)
    assert PromptStore.open(str(path)).manifest.num_users == len(s.user_ids)  # the refused write changed nothing

    new_ids = np.array(["v1", "v0"])
    new_prompts = np.full((2, s.l, s.d), 0.5, np.float32)
    _write(s, path, user_ids=new_ids, prompts=new_prompts, shard_rows=4, overwrite=True)
    assert _shard_files(path) == ["part-00000.parquet"]  # no old shard left behind
    store = PromptStore.open(str(path))
    ids, prompts = store.read_all()
    assert ids.tolist() == ["v0", "v1"] and store.manifest.num_users == 2
    np.testing.assert_array_equal(prompts, new_prompts)


def test_bad_shard_rows_refused(tmp_path, store_inputs):
    s = store_inputs
    with pytest.raises(StoreError, match="shard_rows must be >= 1"):
        StoreWriter(str(tmp_path / "s"), s.identity, s.l, s.template, s.task, shard_rows=0)
