"""The synthetic generator: determinism, chunking invariance, the statistical structure it promises, persistence."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from puma_ray.data.records import DataError
from puma_ray.data.synthetic import (
    ML100K_MARGINALS,
    SyntheticConfig,
    generate_synthetic,
    iter_synthetic_chunks,
    read_synthetic,
    synthetic_ground_truth,
    write_synthetic,
)

SMALL = SyntheticConfig(n_users=300, n_items=1000, seed=7)


@pytest.fixture(scope="module")
def big():
    """~2k users: enough for the marginals and spreads to be stable, ~0.5 s to generate."""
    cfg = SyntheticConfig(n_users=2000, seed=3)
    return cfg, generate_synthetic(cfg)


def test_deterministic_per_seed():
    a, b = generate_synthetic(SMALL), generate_synthetic(SMALL)
    pd.testing.assert_frame_equal(a.records, b.records)
    pd.testing.assert_frame_equal(a.items, b.items)
    other = generate_synthetic(SyntheticConfig(n_users=300, n_items=1000, seed=8))
    assert not a.records[["item_id", "label"]].equals(other.records[["item_id", "label"]])


def test_chunking_invariant_and_prefix_stable():
    cfg = SyntheticConfig(n_users=700, n_items=1000, seed=11)
    whole = generate_synthetic(cfg, users_per_chunk=1000).records
    # chunk sizes that are not multiples of the internal block, so chunks cut through blocks
    chunked = pd.concat(iter_synthetic_chunks(cfg, users_per_chunk=97), ignore_index=True)
    pd.testing.assert_frame_equal(whole, chunked)
    # the first 300 users of a 700-user dataset are the 300-user dataset
    prefix = generate_synthetic(SyntheticConfig(n_users=300, n_items=1000, seed=11), users_per_chunk=128).records
    pd.testing.assert_frame_equal(prefix, whole[whole["user_id"] < "u00000300"].reset_index(drop=True))


def test_label_marginals_near_movielens(big):
    _, ds = big
    shares = ds.records["label"].value_counts(normalize=True).sort_index()
    assert list(shares.index) == [1.0, 2.0, 3.0, 4.0, 5.0]
    np.testing.assert_allclose(shares.to_numpy(), ML100K_MARGINALS, atol=0.02)


def test_per_user_variance_spread_and_tracks_noise(big):
    cfg, ds = big
    std = ds.records.groupby("user_id")["label"].std()
    p10, p90 = std.quantile(0.1), std.quantile(0.9)
    assert p90 > 1.4 * p10, (p10, p90)
    truth = synthetic_ground_truth(cfg)
    assert list(std.index) == list(truth["user_ids"])
    assert np.corrcoef(std.to_numpy(), truth["noise_scale"])[0, 1] > 0.4


def test_popularity_skewed_and_counts_heavy_tailed(big):
    cfg, ds = big
    per_item = ds.records["item_id"].value_counts()
    top = per_item.iloc[: cfg.n_items // 10].sum()
    assert top / len(ds.records) > 0.30
    per_user = ds.records.groupby("user_id").size()
    assert per_user.min() >= cfg.min_records and per_user.max() <= cfg.max_records
    assert per_user.max() > 3 * per_user.median()  # heavy tail
    truth = synthetic_ground_truth(cfg)
    np.testing.assert_array_equal(per_user.to_numpy(), truth["n_records"])


def test_ground_truth_explains_labels(big):
    cfg, ds = big
    truth = synthetic_ground_truth(cfg)
    mean = ds.records.groupby("user_id")["label"].mean()
    assert np.corrcoef(mean.to_numpy(), truth["user_bias"])[0, 1] > 0.5
    assert truth["user_factors"].shape == (cfg.n_users, cfg.latent_dim)
    assert truth["item_factors"].shape == (cfg.n_items, cfg.latent_dim)
    assert np.all(np.diff(truth["thresholds"]) > 0)


def test_records_contract_and_chronology():
    ds = generate_synthetic(SMALL)
    r = ds.records
    assert r["label"].dtype == np.float32 and r["timestamp"].dtype == np.int64
    assert not r.duplicated(["user_id", "item_id"]).any()  # a user rates an item once
    for _, g in r.groupby("user_id"):
        assert np.all(np.diff(g["timestamp"].to_numpy()) > 0)  # strictly increasing per user
        n = len(g)
        assert (g["split"] == "test").sum() == max(1, round(n * 0.1))
        assert set(g["split"].iloc[-1:]) == {"test"} and g["split"].iloc[0] == "train"
    texts = ds.items["text"]
    assert texts.str.match(r"^Item \d+: [a-z ]+, [a-z ]+; (panned|mixed reviews|well reviewed|acclaimed)$").all()
    assert ds.items["item_id"].iloc[42] == "i0000042" and texts.iloc[42].startswith("Item 42: ")


def test_write_read_round_trip(tmp_path):
    cfg = SyntheticConfig(n_users=300, n_items=1000, seed=5)
    manifest = write_synthetic(cfg, str(tmp_path / "syn"), rows_per_file=5000, users_per_chunk=64)
    files = sorted(p.name for p in (tmp_path / "syn").iterdir())
    assert files[:2] == ["dataset.json", "items.parquet"]
    assert len(manifest["files"]) > 1 and all(re.fullmatch(r"records-\d{5}\.parquet", f) for f in files[2:])
    on_disk = json.loads((tmp_path / "syn" / "dataset.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert SyntheticConfig.from_dict(on_disk["config"]) == cfg
    back = read_synthetic(str(tmp_path / "syn"))
    mem = generate_synthetic(cfg)
    pd.testing.assert_frame_equal(back.records, mem.records)
    pd.testing.assert_frame_equal(back.items, mem.items)
    assert manifest["counts"]["users"] == 300
    expected = {s: int((mem.records["split"] == s).sum()) for s in ("train", "valid", "test")}
    assert manifest["counts"]["records"] == expected
    # whole users per file
    firsts = [pd.read_parquet(tmp_path / "syn" / f["path"])["user_id"] for f in manifest["files"]]
    assert all(a.iloc[-1] < b.iloc[0] for a, b in zip(firsts, firsts[1:]))


def test_write_read_through_fsspec_url():
    """Any fsspec URL works (memory:// here; s3:// the same way, with storage_options for the endpoint)."""
    import fsspec

    url = "memory://puma-test-synthetic/run1"
    try:
        write_synthetic(SMALL, url, rows_per_file=4000)
        assert fsspec.filesystem("memory").exists("/puma-test-synthetic/run1/dataset.json")
        pd.testing.assert_frame_equal(read_synthetic(url).records, generate_synthetic(SMALL).records)
    finally:
        fsspec.filesystem("memory").rm("/puma-test-synthetic", recursive=True)


def test_read_synthetic_refuses_incomplete(tmp_path):
    with pytest.raises(DataError, match="no dataset.json"):
        read_synthetic(str(tmp_path))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_users": 0}, "n_users"),
        ({"latent_dim": 17}, "latent_dim"),
        ({"seed": -1}, "seed"),
        ({"noise_median": 0}, "noise_median"),
        ({"min_records": 2}, "min_records"),
        ({"n_items": 500, "max_records": 400}, "n_items // 2"),
        ({"label_marginals": (0.5, 0.5, 0.1, 0.1, 0.1)}, "sum to 1"),
        ({"zipf_exponent": 3.0}, "zipf_exponent"),
        ({"n_users": 10.5}, "must be an int"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**kwargs)
