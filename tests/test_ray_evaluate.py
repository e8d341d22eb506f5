"""Evaluation on a Ray Data actor pool (ray_layer/evaluate.py) = the in-process evaluation, rating and CTR."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("_model_cache")]


def _ctr_dataset(rating):
    """The toy users as clicks (label >= 4) with their earlier items as the history."""
    from puma_ray.data.records import Dataset, validate
    records = rating.records.sort_values(["user_id", "timestamp"]).copy()
    records["label"] = (records["label"] >= 4).astype(np.float32)
    records["history"] = [list(g.iloc[max(0, k - 3):k]) for _, g in records.groupby("user_id")["item_id"]
                          for k in range(len(g))]
    return validate(Dataset(records.reset_index(drop=True), rating.items, "ctr", "toy-ctr", {}))


@pytest.fixture(scope="module", params=["rating", "ctr"])
def trained(request, toy_dataset, tmp_path_factory):
    from puma_ray.recipes.train_prompts import TrainPromptsJobConfig, train_store
    ds = toy_dataset if request.param == "rating" else _ctr_dataset(toy_dataset)
    cfg = TrainPromptsJobConfig()
    cfg.model.name = "tiny:qwen2"
    cfg.train.epochs, cfg.train.batch_size = 1, 32
    path = str(tmp_path_factory.mktemp("eval") / "store")
    train_store(cfg, ds, path, log=lambda m: None)
    return ds, cfg.model, path


def _in_process(ds, model, path, split):
    from puma_ray.artifacts.store import PromptStore
    from puma_ray.config import TemplateConfig
    from puma_ray.models.backbone import load_backbone
    from puma_ray.models.heads import load_head
    from puma_ray.models.prompted_lm import PromptedLM
    from puma_ray.recipes.train_prompts import item_texts
    from puma_ray.training.evaluate import evaluate
    from puma_ray.training.records import RecordSet
    store = PromptStore.open(path)
    ids, prompts = store.read_all()
    plm = PromptedLM(load_backbone(model.name), TemplateConfig(**store.manifest.template), 1, item_texts(ds))
    table = torch.from_numpy(prompts)
    return evaluate(plm, load_head(*store.read_head()), ds.task, lambda idx: table[idx],
                    RecordSet.from_frame(ds.split(split), ids), 64)


def test_ray_evaluation_equals_in_process(local_ray, trained, split="test"):
    from puma_ray.ray_layer.evaluate import evaluate_store_on_ray
    from puma_ray.recipes.train_prompts import item_texts
    ds, model, path = trained
    want = _in_process(ds, model, path, split)
    lines = []
    got = evaluate_store_on_ray(path, model, ds.split(split), item_texts(ds), ds.task, actors=2, cpus_per_actor=0.5,
                                blocks_per_actor=3, batch_size=16, log=lines.append)
    assert got["records"] == want["records"] == len(ds.split(split))
    # progress as the blocks arrive; the last line has every block and record
    assert lines and f"6 of 6 blocks, {len(ds.split(split)):,} records" in lines[-1], lines
    for metric in want:
        assert got[metric] == pytest.approx(want[metric], abs=1e-6), (metric, got, want)


@pytest.mark.parametrize("trained", ["rating"], indirect=True)
def test_a_user_without_prompt_is_one_line(local_ray, trained):
    from puma_ray.errors import StoreError
    from puma_ray.ray_layer.evaluate import evaluate_store_on_ray
    from puma_ray.recipes.train_prompts import item_texts
    ds, model, path = trained
    records = pd.concat([ds.split("test"), ds.split("test").iloc[:1].assign(user_id="stranger")])
    with pytest.raises(StoreError, match=r"user 'stranger' of the records has no prompt"):
        evaluate_store_on_ray(path, model, records, item_texts(ds), ds.task, actors=1, cpus_per_actor=0.5)


@pytest.mark.parametrize("trained", ["rating", pytest.param("ctr", marks=pytest.mark.slow)], indirect=True)
def test_adapter_evaluation_on_records_files_equals_in_process(local_ray, trained, tmp_path):
    """PromptSource "adapter": the actors map the source store's prompts with the adapter (nothing written) and
    read the test split from the Parquet files themselves (RecordFiles): = in-process, rating and CTR."""
    from puma_ray.artifacts.adapter_io import save_adapter
    from puma_ray.artifacts.store import PromptStore
    from puma_ray.config import ModelConfig, TemplateConfig
    from puma_ray.data import save_dataset
    from puma_ray.models.adapter import AdapterConfig, PromptAdapter
    from puma_ray.models.backbone import load_backbone
    from puma_ray.models.heads import head_config, make_head
    from puma_ray.models.prompted_lm import PromptedLM
    from puma_ray.ray_layer.evaluate import PromptSource, RecordFiles, evaluate_on_ray
    from puma_ray.recipes.train_prompts import item_texts
    from puma_ray.training.evaluate import evaluate
    from puma_ray.training.records import RecordSet
    ds, model, path = trained
    store = PromptStore.open(path)
    target = load_backbone("tiny:llama")
    torch.manual_seed(0)
    adapter = PromptAdapter([store.manifest.hidden_size], target.hidden_size, AdapterConfig(), seed=0).eval()
    head = make_head(ds.task)
    folder = str(tmp_path / "adapter")
    save_adapter(folder, adapter, head, head_config(ds.task, head),
                 {"sources": [vars(store.identity)], "target": vars(target.identity)})
    template = TemplateConfig(**store.manifest.template)
    ids, prompts = store.read_all()
    with torch.no_grad():
        mapped = adapter(torch.from_numpy(prompts))
    plm = PromptedLM(target, template, 1, item_texts(ds))
    want = evaluate(plm, head.eval(), ds.task, lambda idx: mapped[idx], RecordSet.from_frame(ds.split("test"), ids),
                    64)
    files = save_dataset(ds, str(tmp_path / "data"))
    got = evaluate_on_ray(PromptSource("adapter", folder, (path,)), ModelConfig(name="tiny:llama"),
                          RecordFiles((files["records"],), "test"), item_texts(ds), ds.task, template=template,
                          actors=2, cpus_per_actor=0.5, blocks_per_actor=2, batch_size=16)
    assert got["records"] == want["records"] == len(ds.split("test"))
    for metric in want:
        assert got[metric] == pytest.approx(want[metric], abs=1e-6), (metric, got, want)
    if ds.task == "ctr":  # the refusal once is enough
        return
    with pytest.raises(Exception, match=r"maps to tiny:llama, not to"):
        evaluate_on_ray(PromptSource("adapter", folder, (path,)), ModelConfig(name="tiny:qwen2"),
                        RecordFiles((files["records"],), "test"), item_texts(ds), ds.task, template=template,
                        actors=1, cpus_per_actor=0.5)
