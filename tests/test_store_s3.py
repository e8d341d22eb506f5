"""The personalization store on S3: the same round trip and refusals against moto's real S3 endpoint on loopback."""
from __future__ import annotations

import hashlib
import json
import uuid

import numpy as np
import pytest
import torch

from puma_ray.artifacts.store import MANIFEST, SHARD_DIR, PromptStore, StoreError, StoreWriter, write_store
from puma_ray.fs import StorageOptions, filesystem


@pytest.fixture
def s3(s3_server):
    """(s3:// prefix unique to the test, StorageOptions for the server)."""
    prefix = f"s3://{s3_server['bucket']}/stores/{uuid.uuid4().hex[:10]}"
    storage = StorageOptions(endpoint_url=s3_server["endpoint_url"], key=s3_server["key"],
                             secret=s3_server["secret"], region="us-east-1")
    return prefix, storage


def _write(s, path, storage, **kwargs):
    return write_store(path, s.identity, s.user_ids, s.prompts, s.head_state, s.head_config, template=s.template,
                       task=s.task, lineage=s.lineage, provenance=s.provenance, storage=storage, **kwargs)


def test_round_trip_s3(s3, store_inputs):
    (path, storage), s = s3, store_inputs
    manifest = _write(s, path, storage, shard_rows=4)
    assert [e["rows"] for e in manifest.shards] == [4, 4, 3]

    # the objects are really in the bucket, and the manifest's checksums are of their bytes
    fs, root = filesystem(path, storage)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{SHARD_DIR}", refresh=True))
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    raw = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    for entry in raw["shards"]:
        assert hashlib.sha256(fs.cat_file(f"{root}/{SHARD_DIR}/{entry['name']}")).hexdigest() == entry["sha256"]
    assert raw["model"]["fingerprint"] == s.identity.fingerprint and raw["num_users"] == len(s.user_ids)

    store = PromptStore.open(path, storage)
    assert store.identity == s.identity and store.prompt_shape == (s.l, s.d)
    ids, prompts = store.read_all()
    order = np.argsort(s.user_ids)
    assert ids.tolist() == sorted(s.user_ids.tolist())
    np.testing.assert_array_equal(prompts, s.prompts[order])
    state, config = store.read_head()
    assert config == s.head_config
    for k, v in s.head_state.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)


def test_missing_manifest_refused_s3(s3, store_inputs):
    (path, storage), s = s3, store_inputs
    w = StoreWriter(path, s.identity, s.l, s.template, s.task, shard_rows=4, storage=storage)
    w.write(s.user_ids, s.prompts)
    w.write_head(s.head_state, s.head_config)  # no close(): no manifest
    with pytest.raises(StoreError, match=rf"has no {MANIFEST} \(incomplete"):
        PromptStore.open(path, storage)
    with pytest.raises(StoreError, match=rf"has no {MANIFEST} \(no such path\)"):
        PromptStore.open(path + "-nothing-here", storage)


def test_overwrite_s3(s3, store_inputs):
    (path, storage), s = s3, store_inputs
    _write(s, path, storage, shard_rows=4)
    with pytest.raises(StoreError, match="already exists"):
        _write(s, path, storage)
    _write(s, path, storage, shard_rows=100, overwrite=True)
    fs, root = filesystem(path, storage)
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{SHARD_DIR}", refresh=True)] == ["part-00000.parquet"]
    store = PromptStore.open(path, storage)
    assert [e["rows"] for e in store.manifest.shards] == [len(s.user_ids)]
    assert len(store.read_all()[0]) == len(s.user_ids)


def test_open_with_endpoint_and_credentials_from_env(s3, store_inputs, s3_server, monkeypatch):
    """No StorageOptions at all: AWS_ENDPOINT_URL + AWS_ACCESS_KEY_ID/SECRET from the environment suffice."""
    (path, storage), s = s3, store_inputs
    _write(s, path, storage, shard_rows=5)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    store = PromptStore.open(path)
    ids, prompts = store.read_all()
    assert ids.tolist() == sorted(s.user_ids.tolist())
    np.testing.assert_array_equal(prompts, s.prompts[np.argsort(s.user_ids)])
