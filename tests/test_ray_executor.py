"""The Ray executor's parts (engine.driver: lean, recipes/migration/on_ray.py over ray_layer/shard_pass.py and
user_rows.py): the driver reads per-user rows and the fit users' data only, and each part's clusters, scales,
records and losses are the in-process ones. The whole run against the in-process executor: test_executor_parity.py."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from conftest import lean_config, write_random_store

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("_model_cache")]


# mini-batch on a sample + assignment on actors; plain K-means (the in-process branch: run on purpose)
@pytest.mark.parametrize("sample", [100, pytest.param(10_000, marks=pytest.mark.slow)])
def test_lean_clusters_and_scale_are_the_in_process_ones(local_ray, lean_data, sample):
    from puma_ray.artifacts.store import PromptStore
    from puma_ray.artifacts.store_index import StoreIndex
    from puma_ray.ray_layer.shard_pass import lean_clusters, shard_pass
    from puma_ray.recipes.migration.in_process import prompt_rms
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
    from puma_ray.ray_layer.shard_pass import lean_clusters, shard_pass
    from puma_ray.ray_layer.user_rows import joined_users
    from puma_ray.recipes.migration.in_process import prompt_rms
    from puma_ray.selection.strategies import kmeans_labels
    _, _, path, folder = lean_data
    first = PromptStore.open(path)
    all_users = first.read_all()[0]
    second_path = folder / "second-store"
    if not second_path.exists():
        write_random_store(str(second_path), all_users[10:], model="tiny:qwen2", seed=1, shard_rows=50)
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
    from puma_ray.recipes.migration.on_ray import check_lean
    cfg = lean_config(lean_data, "/tmp/unused")
    check_lean(cfg)
    for change, message in [({"data": {"name": "movielens100k"}}, "data.name must be parquet"),
                            ({"selection": {"strategy": "kmeans_pca"}}, "selection.strategy 'kmeans_pca'"),
                            ({"baselines": {"random_init": True}}, "baselines.random_init"),
                            ({"data": {"max_users": 10}}, "data.max_users")]:
        with pytest.raises(ConfigError, match=message):
            check_lean(lean_config(lean_data, "/tmp/unused", change))


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
    from puma_ray.ray_layer.shard_pass import lean_ffn_clusters, shard_pass, source_plm
    from puma_ray.selection.statistics import ffn_features
    from puma_ray.selection.strategies import kmeans_labels
    _, _, path, _ = lean_data
    store = PromptStore.open(path)
    users, prompts = store.read_all()
    plm = source_plm(ModelConfig(name="tiny:llama"), store)
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


def test_gate_sums_on_the_actors_are_the_in_process_ones(local_ray, lean_data):
    """OnRay.gate_sums (each actor holds the old and the new system over its block of validation records) against
    InProcess.gate_sums (every record in this process): the same per-user sums and verdicts; users the converted
    store lacks (a conversion's rejects) are not gated by either."""
    from types import SimpleNamespace

    from puma_ray.artifacts.store import PromptStore
    from puma_ray.config import TemplateConfig
    from puma_ray.conversion.run import join_sources
    from puma_ray.models.backbone import load_backbone
    from puma_ray.models.prompted_lm import PromptedLM
    from puma_ray.recipes.migration.executor import Run
    from puma_ray.recipes.migration.in_process import InProcess
    from puma_ray.recipes.migration.on_ray import OnRay
    from puma_ray.recipes.train_prompts import item_texts
    from puma_ray.training.gate import STAT_COLUMNS, gate_from_stats
    ds, paths, source_path, folder = lean_data
    users = np.sort(ds.users.astype(str))
    target_path = str(folder / "gate-target")
    if not os.path.exists(target_path):  # "converted": a tiny:qwen2 store lacking 3 users
        write_random_store(target_path, users[3:], model="tiny:qwen2", seed=2)
    cfg = lean_config(lean_data, str(folder / "gate-run"))
    run = Run(cfg, str(folder / "gate-run"), log=lambda m: None)
    source = PromptStore.open(source_path)
    template, texts = TemplateConfig(**source.manifest.template), item_texts(ds)
    joined = join_sources([source])
    fits = SimpleNamespace(plm=PromptedLM(load_backbone("tiny:qwen2"), template, 1, texts))
    in_process = SimpleNamespace(task="rating", template=template, l=1, texts=texts,
                                 backbones=[load_backbone("tiny:llama")], users=joined.users, prompts=joined,
                                 records=ds, head=source.read_head())
    want = InProcess().gate_sums(run, in_process, fits, target_path)
    on_ray = SimpleNamespace(task="rating", template=template, texts=texts, stores=[source],
                             records=SimpleNamespace(path=paths["records"]))
    got = OnRay(None, None).gate_sums(run, on_ray, fits, target_path)
    assert got.index.tolist() == want.index.tolist() and len(got) == len(users) - 3
    assert not set(users[:3]) & set(got.index)
    np.testing.assert_array_equal(got["records"], want["records"])
    for column in STAT_COLUMNS[1:]:
        np.testing.assert_allclose(got[column], want[column], rtol=1e-6, atol=1e-9, err_msg=column)
    assert gate_from_stats(got)["verdict"].tolist() == gate_from_stats(want)["verdict"].tolist()
