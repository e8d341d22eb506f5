"""Foundation pretraining (`foundation:<family>`): deterministic per seed, train split only, card last, and stores
trained on a foundation are bound to it."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from puma_ray.config import FoundationConfig, ModelConfig, PromptTrainConfig, TemplateConfig
from puma_ray.data import Dataset
from puma_ray.recipes.foundation import CARD, ensure_foundation, read_card, resolve_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the smallest recipe that still trains every part: a few seconds per foundation
SMALL = FoundationConfig(hidden_size=16, layers=1, heads=2, vocab_size=400, epochs=1, batch_size=64)


def _pretrain(ds: Dataset, root: str, family: str = "llama", seed: int = 0, cfg: FoundationConfig = SMALL) -> str:
    return ensure_foundation(family, seed, cfg, ds.split("train"), ds.items, TemplateConfig(), ds.task, ds.name,
                             root=root, log=lambda m: None)


def _fingerprint(folder: str) -> str:
    return read_card(folder)["fingerprint"]


def test_deterministic_per_seed(toy_dataset, tmp_path):
    a = _pretrain(toy_dataset, str(tmp_path / "a"))
    b = _pretrain(toy_dataset, str(tmp_path / "b"))
    other = _pretrain(toy_dataset, str(tmp_path / "c"), seed=1)
    assert os.path.basename(a) == os.path.basename(b)
    assert _fingerprint(a) == _fingerprint(b)
    assert _fingerprint(other) != _fingerprint(a)
    # the weights on disk are the ones the card names (what a store binds to)
    from puma_ray.models.backbone import load_backbone
    assert load_backbone(a).identity.fingerprint == _fingerprint(a)


def _with_sentinels(ds: Dataset) -> Dataset:
    """The same train split; every valid and test record replaced by a sentinel (another item, label, time)."""
    records = ds.records.copy()
    held_out = records["split"] != "train"
    records.loc[held_out, "item_id"] = "SENTINEL"
    records.loc[held_out, "label"] = np.float32(1.0)
    records.loc[held_out, "timestamp"] = records["timestamp"].max() + 1000
    items = pd.concat([ds.items, pd.DataFrame({"item_id": ["SENTINEL"], "text": ["Sentinel Movie Never Seen"]})],
                      ignore_index=True)
    return Dataset(records, items, ds.task, ds.name, ds.provenance)


def test_never_reads_valid_or_test_records(toy_dataset, tmp_path):
    clean = _pretrain(toy_dataset, str(tmp_path / "clean"))
    planted = _with_sentinels(toy_dataset)
    assert (planted.split("valid")["item_id"] == "SENTINEL").all() and len(planted.split("test"))
    dirty = _pretrain(planted, str(tmp_path / "dirty"))
    assert os.path.basename(clean) == os.path.basename(dirty)  # same cache key: nothing held out enters it
    assert _fingerprint(clean) == _fingerprint(dirty)
    card = read_card(dirty)
    assert card["data"]["split"] == "train" and card["data"]["records"] == len(toy_dataset.split("train"))
    with open(os.path.join(dirty, "tokenizer.json")) as f:  # the sentinel's words never reached the vocabulary
        assert "Sentinel" not in f.read()


def test_card_is_written_last(toy_dataset, tmp_path, monkeypatch):
    root = str(tmp_path / "models")
    import puma_ray.recipes.foundation as foundation

    def fail(model):
        raise RuntimeError("disk full")

    monkeypatch.setattr(foundation, "weight_fingerprint", fail)  # after the weights, before the card
    with pytest.raises(RuntimeError):
        _pretrain(toy_dataset, root)
    assert not [n for n in os.listdir(root) if ".tmp" not in n]  # no complete-looking folder was published
    monkeypatch.undo()
    folder = _pretrain(toy_dataset, root)
    card_time = os.path.getmtime(os.path.join(folder, CARD))
    assert all(os.path.getmtime(os.path.join(folder, n)) <= card_time for n in os.listdir(folder))
    card = read_card(folder)
    for key in ("family", "hidden_size", "layers", "seed", "data", "recipe", "steps", "final_epoch_loss", "wall_s",
                "fingerprint"):
        assert card[key] is not None, key
    assert card["data"]["records_sha256"] and card["recipe"]["config"]["epochs"] == 1


def test_cached_and_reused(toy_dataset, tmp_path):
    root = str(tmp_path / "models")
    first = _pretrain(toy_dataset, root)
    stamp = os.path.getmtime(os.path.join(first, CARD))
    assert _pretrain(toy_dataset, root) == first
    assert os.path.getmtime(os.path.join(first, CARD)) == stamp  # not pretrained again
    wider = _pretrain(toy_dataset, root, cfg=FoundationConfig(**{**vars(SMALL), "hidden_size": 24}))
    assert wider != first and read_card(wider)["hidden_size"] == 24


def test_store_on_a_foundation_is_refused_elsewhere(toy_dataset, tmp_path, monkeypatch):
    """A store trained on a pretrained foundation belongs to it: not to its un-pretrained base (same family, width
    and seed, random weights), nor to the same foundation pretrained with another seed."""
    from puma_ray.artifacts.store import ModelIdentity, PromptStore, StoreError
    from puma_ray.models.backbone import load_backbone, weight_fingerprint
    from puma_ray.recipes.foundation import train_item_texts
    from puma_ray.recipes.train_prompts import TrainPromptsJobConfig, train_store
    from puma_ray.training.pretrain import build_model

    monkeypatch.setenv("PUMA_MODEL_CACHE", str(tmp_path / "models"))
    model = ModelConfig(name="foundation:llama", seed=0, foundation=SMALL)
    resolved = resolve_model(model, toy_dataset, None, log=lambda m: None)
    job = TrainPromptsJobConfig(model=resolved, train=PromptTrainConfig(epochs=1, batch_size=64))
    train_store(job, toy_dataset, str(tmp_path / "store"), log=lambda m: None)
    store = PromptStore.open(str(tmp_path / "store"))
    store.check_model(load_backbone(resolved.name).identity)  # its own foundation: accepted

    base, _ = build_model("llama", SMALL, 0, train_item_texts(toy_dataset.split("train"), toy_dataset.items))
    base_identity = ModelIdentity("base", "llama", SMALL.hidden_size, weight_fingerprint(base))
    other = resolve_model(ModelConfig(name="foundation:llama", seed=1, foundation=SMALL), toy_dataset, None,
                          log=lambda m: None)
    for identity in (base_identity, load_backbone(other.name).identity):
        with pytest.raises(StoreError, match="means nothing|mean nothing"):
            store.check_model(identity)


def test_foundation_config_is_checked():
    from puma_ray.config import ConfigError, from_dict

    def model(**kw):
        return from_dict(ModelConfig, kw, "model")
    with pytest.raises(ConfigError, match="model.foundation"):
        model(name="tiny:llama", foundation={"hidden_size": 32})
    with pytest.raises(ConfigError, match="hidden_size"):
        model(name="foundation:llama", foundation={"hidden_size": 0})
    with pytest.raises(ConfigError, match=r"model.foundation: unknown key\(s\) \['widht'\]"):
        model(name="foundation:llama", foundation={"widht": 32})
    with pytest.raises(ConfigError, match="model.foundation.hidden_size must be an integer, got 'wide'"):
        model(name="foundation:llama", foundation={"hidden_size": "wide"})
    cfg = model(name="foundation:qwen2", seed=3, foundation={"hidden_size": 32})
    assert isinstance(cfg.foundation, FoundationConfig) and cfg.foundation.hidden_size == 32
    assert json.dumps(vars(cfg.foundation))


def test_shared_prompt_is_one_prompt_for_everyone(toy_dataset):
    """train.shared: one row trained for every user (the personalization control); the store still has all users."""
    from puma_ray.models.backbone import load_backbone
    from puma_ray.models.prompted_lm import PromptedLM
    from puma_ray.recipes.train_prompts import item_texts
    from puma_ray.training.prompts import train_prompts

    backbone = load_backbone("tiny:llama")
    plm = PromptedLM(backbone, TemplateConfig(), 1, item_texts(toy_dataset))
    cfg = PromptTrainConfig(epochs=1, batch_size=64, shared=True)
    users = toy_dataset.users
    result = train_prompts(plm, "rating", toy_dataset.split("train"), toy_dataset.split("valid"), users, cfg,
                           log=lambda m: None)
    assert result.prompts.shape == (len(users), 1, backbone.hidden_size)
    assert np.all(result.prompts == result.prompts[:1])  # the same vector for every user
    init = PromptTrainConfig(epochs=1, batch_size=64, shared=True, lr=1e-9)  # barely moves: trained rows differ
    barely = train_prompts(plm, "rating", toy_dataset.split("train"), toy_dataset.split("valid"), users, init,
                           log=lambda m: None)
    assert not np.allclose(barely.prompts[0], result.prompts[0])


def test_migration_between_two_foundations(toy_dataset, tmp_path, monkeypatch):
    """foundation:<family> names work in a migrate config: both pretrained on the run's data (train split), the
    source store bound to its foundation, the report carries both cards and the reference rows."""
    import puma_ray.recipes.migration as migration
    from puma_ray.artifacts.store import PromptStore
    from puma_ray.config import from_dict, to_dict
    from puma_ray.data import save_dataset

    monkeypatch.setenv("PUMA_MODEL_CACHE", str(tmp_path / "models"))
    paths = save_dataset(toy_dataset, str(tmp_path / "data"))
    small = to_dict(SMALL)
    cfg = from_dict(migration.MigrateJobConfig, {
        "sources": [{"store": "{output}/source-store", "prepare": {"epochs": 1, "batch_size": 64},
                     "model": {"name": "foundation:llama", "seed": 0, "foundation": small}}],
        "target": {"name": "foundation:qwen2", "seed": 1, "foundation": {**small, "hidden_size": 24}},
        "data": {"name": "parquet", "paths": paths},
        "selection": {"strategy": "random", "k": 3, "budget": 8, "valid_users": 5},
        "fit": {"epochs": 1, "batch_size": 64}, "baselines": {"random_init": False, "linear": False},
        "store": {"shard_rows": 16}, "convert": {"runs_on": "local"}, "engine": {"kind": "local"}}, "test")
    report = migration.run(cfg, str(tmp_path / "run"), log=lambda m: None)
    cards = list(report["foundations"].values())
    assert [(c["family"], c["hidden_size"], c["seed"]) for c in cards] == [("llama", 16, 0), ("qwen2", 24, 1)]
    assert report["source"]["fingerprint"] == cards[0]["fingerprint"]
    assert report["target"]["fingerprint"] == cards[1]["fingerprint"]
    assert report["target"]["hidden_size"] == 24 and set(report["reference"]) == {"global_mean", "user_mean", "bias"}
    store = PromptStore.open(str(tmp_path / "run" / "source-store"))
    assert store.identity.fingerprint == cards[0]["fingerprint"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3", "stablelm"])
def test_every_family_builds_saves_and_reloads_at_any_size(family, toy_dataset, tmp_path):
    """A foundation of each family at another width and depth than its tiny model: saves as a plain HF folder and
    reloads with from_pretrained, with the same weights (fingerprint) and its quirks (Gemma's sqrt(d) scale)."""
    import torch

    from puma_ray.models.backbone import load_backbone, weight_fingerprint
    from puma_ray.models.prompted_lm import PromptedLM
    from puma_ray.recipes.foundation import train_item_texts
    from puma_ray.training.pretrain import build_model

    cfg = FoundationConfig(hidden_size=32, layers=3, heads=2, vocab_size=400)
    texts = train_item_texts(toy_dataset.split("train"), toy_dataset.items)
    model, tokenizer = build_model(family, cfg, 0, texts)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path))
    assert backbone.identity.fingerprint == weight_fingerprint(model)
    assert (backbone.hidden_size, backbone.identity.num_layers) == (32, 3)
    plm = PromptedLM(backbone, TemplateConfig(), 1, texts)
    items = list(texts)[:3]
    logits = plm.label_logits(torch.zeros(3, 1, 32), plm.encode(items))
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    if family == "stablelm":  # a quarter of a 12-wide head is 3 rotary dims: refused up front, not mid-forward
        with pytest.raises(ValueError, match="rotary"):
            build_model(family, FoundationConfig(hidden_size=24, heads=2, vocab_size=400), 0, texts)


def test_ctr_foundation_reads_histories_of_the_train_split_only(toy_dataset, tmp_path):
    """CTR (MIND's shape): the template's history titles are item texts the pretraining sees, the "Yes" logit is
    read out; held-out records and their histories stay out of the cache key and the vocabulary."""
    records = toy_dataset.records.copy()
    records["label"] = (records["label"] >= 3).astype("float32")
    items = list(toy_dataset.items["item_id"])
    records["history"] = [items[:3] for _ in range(len(records))]
    ctr = Dataset(records, toy_dataset.items, "ctr", "toy-ctr", {})
    folder = ensure_foundation("qwen2", 0, SMALL, ctr.split("train"), ctr.items, TemplateConfig.for_task("ctr"),
                               "ctr", ctr.name, root=str(tmp_path), log=lambda m: None)
    card = read_card(folder)
    assert card["recipe"]["task"] == "ctr" and card["recipe"]["template"]["labels"] == ["Yes"]
    planted = records.copy()
    held_out = planted["split"] != "train"
    planted["history"] = [["SENTINEL"] if h else list(x) for h, x in zip(held_out, planted["history"])]
    items_plus = pd.concat([ctr.items, pd.DataFrame({"item_id": ["SENTINEL"], "text": ["Sentinel News"]})])
    again = ensure_foundation("qwen2", 0, SMALL, planted[planted["split"] == "train"], items_plus,
                              TemplateConfig.for_task("ctr"), "ctr", ctr.name, root=str(tmp_path / "b"),
                              log=lambda m: None)
    assert read_card(again)["fingerprint"] == card["fingerprint"]


def test_item_tokens_are_train_items_read_before_their_text(toy_dataset, tmp_path):
    """`item_tokens`: one entity token per train item (none for an item only held-out records name), saved with
    the tokenizer, placed before the item's text in every record; the item cap still holds."""
    import dataclasses

    import torch

    from puma_ray.models.backbone import load_backbone
    from puma_ray.models.prompted_lm import PromptedLM, item_token
    from puma_ray.recipes.foundation import train_item_texts

    planted = _with_sentinels(toy_dataset)
    assert SMALL.item_tokens  # the default
    no_entities = dataclasses.replace(SMALL, item_tokens=False)
    folder = _pretrain(planted, str(tmp_path), cfg=SMALL)
    assert os.path.basename(folder) != os.path.basename(_pretrain(planted, str(tmp_path), cfg=no_entities))
    backbone = load_backbone(folder)
    vocab = backbone.tokenizer.get_added_vocab()
    train_items = train_item_texts(planted.split("train"), planted.items)
    assert all(item_token(i) in vocab for i in train_items) and item_token("SENTINEL") not in vocab
    texts = dict(zip(planted.items["item_id"], planted.items["text"]))
    template = TemplateConfig(max_item_tokens=4)
    plm = PromptedLM(backbone, template, 1, texts)
    plain = PromptedLM(load_backbone(_pretrain(planted, str(tmp_path), cfg=no_entities)), template, 1, texts)
    item = next(iter(train_items))
    fill = plm._item_fill(texts[item], vocab[item_token(item)])
    assert fill[0] == vocab[item_token(item)] and len(fill) == 4
    assert fill[1:] == plm._encode_fill(texts[item], 3, keep="start")
    assert len(plm.sequence(item)) == len(plain.sequence(item))  # the entity took a text token's place
    assert plm._item_tokens["SENTINEL"] == plm._encode_fill(texts["SENTINEL"], 4, keep="start")  # no entity
    cached, uncached = PromptedLM(backbone, template, 1, texts), PromptedLM(backbone, template, 1, texts, 0)
    items, prompts = [item, "SENTINEL"], torch.randn(2, 1, SMALL.hidden_size) * plm.embed_rms
    torch.testing.assert_close(cached.label_logits(prompts, cached.encode(items)),
                               uncached.label_logits(prompts, uncached.encode(items)), rtol=1e-4, atol=1e-5)
