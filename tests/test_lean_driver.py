"""The lean driver (engine.driver: lean, ray_layer/lean_migrate.py): the driver reads per-user rows and the fit
users' data only, and its selection, scales, records and metrics are the in-process path's."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("_model_cache")]

SHARD_ROWS = 64  # several shards even for a few hundred users: the shard pass and StoreIndex cross shards


def _write_store(path: str, users: np.ndarray, model: str = "tiny:llama", seed: int = 0,
                 shard_rows: int = SHARD_ROWS) -> str:
    """Random prompts at the model's embedding scale, two clusters of users apart (K-means has something to
    find), bound to the model's identity; users written in a shuffled order (shards are not id ranges)."""
    from puma_ray.artifacts.store import StoreWriter
    from puma_ray.config import TemplateConfig, to_dict
    from puma_ray.models.backbone import embedding_rms, load_backbone
    from puma_ray.models.heads import RatingHead, head_config
    backbone = load_backbone(model)
    d, rms = backbone.identity.hidden_size, embedding_rms(backbone.model)
    rng = np.random.default_rng(seed)
    prompts = (rng.standard_normal((len(users), 1, d)) * rms).astype(np.float32)
    prompts[: len(users) // 2] += 2 * rms
    order = rng.permutation(len(users))
    writer = StoreWriter(path, backbone.identity, 1, to_dict(TemplateConfig()), "rating", shard_rows=shard_rows,
                         lineage={"kind": "trained", "data": "toy", "note": "random"})
    for start in range(0, len(users), shard_rows):
        rows = order[start:start + shard_rows]
        writer.write_shard(users[rows], prompts[rows])
    head = RatingHead()
    writer.write_head(head.state_dict(), head_config("rating", head))
    writer.close()
    return path


@pytest.fixture(scope="module")
def lean_data(tmp_path_factory):
    """240 toy users as parquet files + a tiny:llama source store of them."""
    from conftest import make_toy_dataset

    from puma_ray.data import save_dataset
    folder = tmp_path_factory.mktemp("lean")
    ds = make_toy_dataset(n_users=240, records_per_user=12)
    paths = save_dataset(ds, str(folder / "data"))
    store = _write_store(str(folder / "source-store"), np.sort(ds.users.astype(str)))
    return ds, paths, store, folder


# mini-batch on a sample + assignment on actors; plain K-means (the in-process branch: run on purpose)
@pytest.mark.parametrize("sample", [100, pytest.param(10_000, marks=pytest.mark.slow)])
def test_lean_clusters_and_scale_are_the_in_process_ones(local_ray, lean_data, sample):
    from puma_ray.artifacts.store import PromptStore
    from puma_ray.artifacts.store_index import StoreIndex
    from puma_ray.ray_layer.lean_migrate import lean_clusters, shard_pass
    from puma_ray.recipes.migrate import prompt_rms
    from puma_ray.selection.strategies import kmeans_labels
    _, _, path, _ = lean_data
    store = PromptStore.open(path)
    users, prompts = store.read_all()
    index = StoreIndex(store)
    labels, model = lean_clusters([index], users, 4, 3, sample)
    assert (labels is None) == (sample < len(users)) and (model is None) == (sample >= len(users))
    assigned, _, scales = shard_pass([store], users, model, None, actors=2, cpus_per_actor=0.5)
    got = labels if labels is not None else assigned
    np.testing.assert_array_equal(got, kmeans_labels(prompts.reshape(len(users), -1), 4, 3, sample))
    assert len(np.unique(got)) == 4
    assert scales[0] == pytest.approx(prompt_rms(prompts), rel=1e-9)


@pytest.mark.slow  # ~40 s: two stores, an actor pool
def test_aggregated_sources_and_a_user_one_source_lacks(local_ray, lean_data):
    """Two sources, the second without 10 users: policy reject drops them from selection and scale, as
    conversion.run.join_sources does in memory; policy error names one of them."""
    from puma_ray.artifacts.store import PromptStore, StoreError
    from puma_ray.artifacts.store_index import StoreIndex
    from puma_ray.conversion.run import join_sources
    from puma_ray.ray_layer.lean_migrate import joined_users, lean_clusters, shard_pass
    from puma_ray.recipes.migrate import prompt_rms
    from puma_ray.selection.strategies import kmeans_labels
    _, _, path, folder = lean_data
    first = PromptStore.open(path)
    all_users = first.read_all()[0]
    second_path = folder / "second-store"
    if not second_path.exists():
        _write_store(str(second_path), all_users[10:], model="tiny:qwen2", seed=1, shard_rows=50)
    stores = [first, PromptStore.open(str(second_path))]
    indexes = [StoreIndex(s) for s in stores]
    with pytest.raises(StoreError, match=r"user 'u00\d' is missing from source store .*second-store \(10 user"):
        joined_users(indexes, "error")
    users, dropped = joined_users(indexes, "reject")
    joined = join_sources(stores, "reject")
    np.testing.assert_array_equal(users, joined.users)
    assert dropped == joined.dropped == {str(second_path): 10}
    labels, model = lean_clusters(indexes, users, 3, 0, 100)
    assigned, _, scales = shard_pass(stores, users, model, None, actors=1, cpus_per_actor=0.5)
    flat = np.concatenate([p.reshape(len(users), -1) for p in joined.prompts], axis=1)
    np.testing.assert_array_equal(assigned, kmeans_labels(flat, 3, 0, 100))
    assert scales == pytest.approx([prompt_rms(p) for p in joined.prompts], rel=1e-9)


def test_store_index_reads_rows_and_refuses_what_read_all_refuses(tmp_path, lean_data):
    from puma_ray.artifacts.store import PromptStore, StoreError, StoreWriter
    from puma_ray.artifacts.store_index import StoreIndex
    _, _, path, _ = lean_data
    store = PromptStore.open(path)
    users, prompts = store.read_all()
    index = StoreIndex(store, shards_kept=1)
    pick = users[[5, 200, 3, 131]]
    np.testing.assert_array_equal(index.rows(pick), prompts[[5, 200, 3, 131]])
    with pytest.raises(StoreError, match=r"user 'stranger' has no prompt \(1 user"):
        index.rows(np.array(["stranger", users[0]]))
    # a store whose manifest lists a second shard (from another store) holding one of its users again: valid
    # checksums, so only the index can notice
    for name, rows in (("twice", slice(0, 3)), ("other", slice(2, 4))):
        writer = StoreWriter(str(tmp_path / name), store.identity, 1, store.manifest.template, "rating")
        writer.write_shard(users[rows], prompts[rows], name=f"{name}.parquet")
        writer.write_head(*store.read_head())
        writer.close()
    twice, other = tmp_path / "twice", tmp_path / "other"
    (twice / "shards" / "other.parquet").write_bytes((other / "shards" / "other.parquet").read_bytes())
    manifest = json.loads((twice / "manifest.json").read_text())
    extra = json.loads((other / "manifest.json").read_text())
    manifest["shards"] += extra["shards"]
    manifest["num_users"] += extra["num_users"]
    (twice / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=rf"user '{users[2]}' appears more than once"):
        StoreIndex(PromptStore.open(str(twice)))
    # shards not in id order (a store written by someone else): the index sorts them itself
    backwards = StoreWriter(str(tmp_path / "backwards"), store.identity, 1, store.manifest.template, "rating")
    for k in range(3):
        rows = slice(40 - 10 * k, 50 - 10 * k)
        backwards.write_shard(users[rows][::-1], prompts[rows][::-1], name=f"part-{k}.parquet")
    backwards.write_head(*store.read_head())
    backwards.close()
    index = StoreIndex(PromptStore.open(str(tmp_path / "backwards")))
    np.testing.assert_array_equal(index.users, users[20:50])
    np.testing.assert_array_equal(index.rows(users[[49, 20, 33]]), prompts[[49, 20, 33]])


def test_sorted_positions():
    from puma_ray.artifacts.store_index import sorted_member, sorted_positions
    ids = np.array(["a", "c", "d"])
    np.testing.assert_array_equal(sorted_positions(ids, np.array(["d", "b", "a", "z", ""])), [2, -1, 0, -1, -1])
    np.testing.assert_array_equal(sorted_member(ids[:0], np.array(["a"])), [False])


def test_fit_records_are_read_with_a_filter(lean_data):
    from puma_ray.data.parquet_reads import read_user_records
    ds, paths, _, _ = lean_data
    users = np.sort(ds.users.astype(str))[[0, 17, 230]]
    got = read_user_records(paths["records"], users, ["train", "valid"], None)
    want = ds.records[ds.records["user_id"].isin(users) & ds.records["split"].isin(["train", "valid"])]
    key = ["user_id", "item_id"]
    pd.testing.assert_frame_equal(got.sort_values(key)[key + ["label", "split"]].reset_index(drop=True),
                                  want.sort_values(key)[key + ["label", "split"]].reset_index(drop=True),
                                  check_dtype=False)


def test_settings_the_lean_driver_cannot_honour_are_one_line(lean_data):
    from puma_ray.errors import ConfigError
    from puma_ray.ray_layer.lean_migrate import check_lean
    cfg = _config(lean_data, "/tmp/unused")
    check_lean(cfg)
    for change, message in [({"data": {"name": "movielens100k"}}, "data.name must be parquet"),
                            ({"selection": {"strategy": "kmeans_pca"}}, "selection.strategy 'kmeans_pca'"),
                            ({"baselines": {"random_init": True}}, "baselines.random_init"),
                            ({"data": {"max_users": 10}}, "data.max_users")]:
        with pytest.raises(ConfigError, match=message):
            check_lean(_config(lean_data, "/tmp/unused", change))


def _config(lean_data, output: str, change: dict | None = None):
    from puma_ray.config import from_dict
    from puma_ray.recipes.migrate import MigrateJobConfig
    _, paths, store, _ = lean_data
    raw = {"sources": [{"store": store, "model": {"name": "tiny:llama"}}], "target": {"name": "tiny:qwen2"},
           "data": {"name": "parquet", "paths": paths},
           "selection": {"strategy": "kmeans_variance", "k": 4, "budget": 30, "valid_users": 20,
                         "kmeans_sample": 100},
           "fit": {"epochs": 1, "batch_size": 32, "lr": 0.01, "patience": 1},
           "baselines": {"source": True, "random_init": False, "linear": True, "full_retrain": False,
                         "fits_on": "local"},
           "store": {"shard_rows": SHARD_ROWS}, "convert": {"actors": 1, "progress": False},
           "engine": {"kind": "ray", "num_workers": 1, "driver": "lean", "actors": 2}}
    for section, values in (change or {}).items():
        raw[section] = {**raw[section], **values}
    return from_dict(MigrateJobConfig, raw, "test")


@pytest.mark.slow  # ~4 min on 2 cores: a Train fit and four actor pools
def test_lean_migration_equals_the_in_process_stages(local_ray, lean_data, tmp_path):
    """The whole job with the lean driver: the users it selects, the reference rows, the source store's and the
    adapters' test metrics are those the in-process path computes from the same files."""
    import torch

    from puma_ray.artifacts.adapter_io import load_adapter
    from puma_ray.artifacts.formats import sha256_hex
    from puma_ray.artifacts.store import PromptStore
    from puma_ray.config import TemplateConfig
    from puma_ray.models.backbone import load_backbone
    from puma_ray.models.heads import load_head
    from puma_ray.models.prompted_lm import PromptedLM
    from puma_ray.recipes.engine import engine_functions, migration_runner
    from puma_ray.recipes.migrate import prompt_rms
    from puma_ray.recipes.train_prompts import item_texts
    from puma_ray.selection.statistics import label_variance
    from puma_ray.selection.strategies import SelectionInput, kmeans_labels, select
    from puma_ray.training.evaluate import evaluate
    from puma_ray.training.records import RecordSet
    from puma_ray.training.reference import reference_metrics
    ds, _, store_path, _ = lean_data
    output = str(tmp_path / "run")
    cfg = _config(lean_data, output, {"baselines": {"full_retrain": True, "full_retrain_train": {
        "epochs": 1, "batch_size": 32, "lr": 0.01}}})
    run = migration_runner(cfg)
    report = run(cfg, output, log=lambda m: None, **engine_functions(cfg, output))
    assert report["driver"] == "lean"

    store = PromptStore.open(store_path)
    users, prompts = store.read_all()
    train, test = ds.split("train"), ds.split("test")
    inputs = SelectionInput(users, prompts.reshape(len(users), -1), variance=label_variance(train, users),
                            options={"kmeans_sample": 100, "cluster_bins": 5})
    assert inputs.prompts is not None and len(np.unique(kmeans_labels(inputs.prompts, 4, 0, 100))) == 4
    chosen = select("kmeans_variance", inputs, 30, 4, 0)
    assert report["selection"]["selected_sha256"] == sha256_hex("\n".join(users[chosen]).encode())
    assert report["selection"]["users_total"] == 240 and report["data"]["records"]["test"] == len(test)

    want_ref = reference_metrics("rating", train, test)
    for name in want_ref:
        assert report["reference"][name]["rmse"] == pytest.approx(want_ref[name]["rmse"], abs=1e-9)
    plm = PromptedLM(load_backbone("tiny:llama"), TemplateConfig(**store.manifest.template), 1, item_texts(ds))
    records = RecordSet.from_frame(test, users)
    table = torch.from_numpy(prompts)
    want = evaluate(plm, load_head(*store.read_head()), "rating", lambda idx: table[idx], records, 64)
    assert report["methods"]["source"]["rmse"] == pytest.approx(want["rmse"], abs=1e-6)
    target = PromptedLM(load_backbone("tiny:qwen2"), TemplateConfig(**store.manifest.template), 1, item_texts(ds))
    for name, path in (("puma", report["adapter"]), ("linear", os.path.join(output, "baselines/linear-adapter"))):
        adapter, head, config = load_adapter(path)
        # the scale summed shard by shard on actors = the in-process RMS of every prompt
        assert adapter.source_scales.tolist() == pytest.approx([prompt_rms(prompts)], rel=1e-6)
        with torch.no_grad():
            mapped = adapter(table)
        got = evaluate(target, head, "rating", lambda idx, m=mapped: m[idx], records, 64)
        assert report["methods"][name]["rmse"] == pytest.approx(got["rmse"], abs=1e-5), name
    # full retraining on Ray Train: every user's prompt in the target's store, its own test row, its cost
    assert PromptStore.open(os.path.join(output, "full-retrain-store")).manifest.num_users == 240
    assert report["methods"]["full_retrain"]["records"] == len(test)
    assert report["cost_ratio_full_retrain_over_puma"]["llm_record_passes"] > 1
    assert report["conversion"]["users"] == 240
    with open(os.path.join(output, "target-store", "manifest.json")) as f:
        assert json.load(f)["num_users"] == 240


def test_source_loss_on_actors_is_the_in_process_statistic(local_ray, lean_data):
    """The per-user loss that loss strategies rank by, summed by the evaluation actors over the same seeded
    sample of each user's train records (selection.statistics.loss_sample) = selection.statistics.source_loss."""
    from puma_ray.artifacts.store import PromptStore
    from puma_ray.config import ModelConfig, TemplateConfig
    from puma_ray.models.backbone import load_backbone
    from puma_ray.models.heads import load_head
    from puma_ray.models.prompted_lm import PromptedLM
    from puma_ray.ray_layer.evaluate import RecordFiles, source_loss_on_ray
    from puma_ray.recipes.train_prompts import item_texts
    from puma_ray.selection.statistics import source_loss
    ds, paths, path, _ = lean_data
    store = PromptStore.open(path)
    users, prompts = store.read_all()
    template = TemplateConfig(**store.manifest.template)
    plm = PromptedLM(load_backbone("tiny:llama"), template, 1, item_texts(ds))
    want, cost = source_loss(plm, load_head(*store.read_head()).eval(), "rating", prompts, ds.split("train"), users,
                             max_records=4, seed=7)
    got, records, tokens = source_loss_on_ray(path, ModelConfig(name="tiny:llama"),
                                              RecordFiles((paths["records"],), "train"), item_texts(ds), "rating",
                                              users, template=template, max_records=4, seed=7, actors=2,
                                              cpus_per_actor=0.5, batch_size=64)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert records == cost.forward_records == 4 * len(users)
    # positions computed depend on each batch's padding, and the actors batch their blocks' records
    assert tokens == pytest.approx(cost.tokens_forward, rel=0.02)


@pytest.mark.slow  # ~50 s: the source model in every shard-pass actor
def test_ffn_clusters_on_actors_are_the_in_process_ones(local_ray, lean_data):
    """ffn_* strategies on the lean driver: FFN features of a sample clustered in the driver, every other user
    featurised by the shard-pass actors with the source model and assigned = kmeans_labels of every user's
    features in one process."""
    from puma_ray.artifacts.store import PromptStore
    from puma_ray.artifacts.store_index import StoreIndex
    from puma_ray.config import ModelConfig
    from puma_ray.ray_layer.lean_migrate import _source_plm, lean_ffn_clusters, shard_pass
    from puma_ray.selection.statistics import ffn_features
    from puma_ray.selection.strategies import kmeans_labels
    _, _, path, _ = lean_data
    store = PromptStore.open(path)
    users, prompts = store.read_all()
    plm = _source_plm(ModelConfig(name="tiny:llama"), store)
    labels, kmeans = lean_ffn_clusters(plm, StoreIndex(store), users, 3, 1, 100)
    assert labels is None and kmeans is not None  # 240 users > the sample of 100: assigned on the actors
    _, got, _ = shard_pass([store], users, None, None, actors=2, cpus_per_actor=0.5,
                           ffn={"model": ModelConfig(name="tiny:llama"), "kmeans": kmeans})
    np.testing.assert_array_equal(got, kmeans_labels(ffn_features(plm, prompts)[0], 3, 1, 100))


def test_to_parquet_writes_what_the_parquet_loader_reads(tmp_path):
    """scripts/to_parquet.py: a config's loader run once → the Parquet pair + the data section it prints, which
    loads back to the same records; a bad config is one line and exit 2."""
    import subprocess
    import sys

    import yaml

    from puma_ray.config import DataConfig, from_dict
    from puma_ray.data import load_dataset
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = tmp_path / "c.yaml"
    section = {"name": "synthetic", "options": {"n_users": 30, "n_items": 40, "min_records": 5,
                                                "records_median_extra": 2.0, "max_records": 15}}
    config.write_text(yaml.safe_dump({"data": section}))
    run = subprocess.run([sys.executable, os.path.join(root, "scripts", "to_parquet.py"), "--config", str(config),
                          "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    printed = yaml.safe_load(run.stdout[run.stdout.index("data:"):])["data"]
    back = load_dataset(from_dict(DataConfig, printed, "printed"))
    want = load_dataset(from_dict(DataConfig, section, "data"))
    key = ["user_id", "item_id", "timestamp"]
    pd.testing.assert_frame_equal(back.records.sort_values(key).reset_index(drop=True),
                                  want.records.sort_values(key).reset_index(drop=True), check_dtype=False)
    for data, message in (({"name": "nope"}, "error: unknown data.name 'nope'"),
                          ({**section, "options": {**section["options"], "max_records": 400}},
                           "error: synthetic data options (data.options): max_records (400) must be")):
        config.write_text(yaml.safe_dump({"data": data}))
        bad = subprocess.run([sys.executable, os.path.join(root, "scripts", "to_parquet.py"), "--config",
                              str(config), "--output", str(tmp_path / "bad")], capture_output=True, text=True,
                             timeout=300)
        assert bad.returncode == 2 and bad.stderr.strip().startswith(message), bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
