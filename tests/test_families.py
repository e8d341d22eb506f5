"""Every tiny model family end to end: loading + identity, fingerprints, the prompted readout, prompt training."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from puma_ray.config import PromptTrainConfig, TemplateConfig
from puma_ray.data import limit_users
from puma_ray.models.backbone import embedding_rms, load_backbone, weight_fingerprint
from puma_ray.models.prompted_lm import PromptedLM, TemplateError
from puma_ray.models.tiny import FAMILIES
from puma_ray.training.prompts import train_prompts

FAMILY_NAMES = sorted(FAMILIES)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backbones(_model_cache):
    """load("llama", seed=0, dtype="float32") → Backbone, each loaded once per module (tests must not mutate them)."""
    cache = {}

    def load(family: str, seed: int = 0, dtype: str = "float32"):
        key = (family, seed, dtype)
        if key not in cache:
            cache[key] = load_backbone(f"tiny:{family}", dtype=dtype, seed=seed)
        return cache[key]

    return load


def _item_texts(ds) -> dict[str, str]:
    return dict(zip(ds.items["item_id"], ds.items["text"]))


def test_five_families():
    assert FAMILY_NAMES == ["gemma3", "llama", "phi3", "qwen2", "stablelm"]
    widths = [FAMILIES[f]().hidden_size for f in FAMILY_NAMES]
    assert len(set(widths)) >= 4  # migrations between families really change width


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_load_identity_and_fingerprint(family, backbones, tiny_model):
    config = FAMILIES[family]()
    bb = backbones(family)
    ident = bb.identity
    assert ident.name == f"tiny:{family}"
    assert ident.family == config.model_type  # gemma3 → "gemma3_text": the transformers model type
    assert ident.hidden_size == bb.hidden_size == config.hidden_size
    assert ident.num_layers == 2
    assert ident.num_params == sum(p.numel() for p in bb.model.parameters())
    assert not any(p.requires_grad for p in bb.model.parameters()) and not bb.model.training
    assert len(ident.fingerprint) == 64

    # the folder is a plain HF model folder; loading it again (a fresh load) gives the same fingerprint
    again = load_backbone(tiny_model(family))
    assert again.identity.fingerprint == ident.fingerprint
    assert weight_fingerprint(bb.model) == ident.fingerprint
    # other weights (another seed), other fingerprint
    assert backbones(family, seed=1).identity.fingerprint != ident.fingerprint
    # the same weights in bfloat16 are the same model
    half = backbones(family, dtype="bfloat16")
    assert half.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert half.identity.fingerprint == ident.fingerprint


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_embedding_rms_includes_family_scaling(family, backbones):
    bb = backbones(family)
    weight = bb.model.get_input_embeddings().weight.detach().float()
    raw_rms = float(weight.pow(2).mean().sqrt())
    scale = math.sqrt(bb.hidden_size) if family == "gemma3" else 1.0  # Gemma multiplies embeddings by sqrt(d)
    assert embedding_rms(bb.model) == pytest.approx(scale * raw_rms, rel=0.05)


@pytest.mark.parametrize("cache_mib", [0, 64])  # the full left-padded sequence, and the prefix-cached batch
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prompted_lm_logits(family, cache_mib, backbones, toy_dataset):
    bb = backbones(family)
    plm = PromptedLM(bb, TemplateConfig(), prompt_length=2, item_texts=_item_texts(toy_dataset),
                     prefix_cache_mib=cache_mib)
    assert len(plm.label_ids) == 5 and len(set(plm.label_ids)) == 5
    items = toy_dataset.records["item_id"].to_numpy()[:7]
    batch = plm.encode(items)
    assert batch["slots"].sum(1).tolist() == [2] * 7  # l prompt positions per record
    if not cache_mib:
        assert batch["attention_mask"][:, -1].all()  # left padded: the answer cue is last
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randn(7, 2, bb.hidden_size, generator=gen) * plm.embed_rms
    logits = plm.label_logits(prompts, batch)
    assert logits.shape == (7, 5) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # the prompt is read: another user's prompt changes the logits of the same item
    other = plm.label_logits(torch.randn(7, 2, bb.hidden_size, generator=gen) * plm.embed_rms, batch)
    assert not torch.allclose(logits, other)
    # a record's logits do not depend on what else is in the batch (padding + position ids)
    alone = plm.label_logits(prompts[3:4], plm.encode(items[3:4]))
    torch.testing.assert_close(alone[0], logits[3], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_label_of_two_tokens_refused(family, backbones):
    bb = backbones(family)
    assert len(bb.tokenizer.encode("12", add_special_tokens=False)) == 2
    template = TemplateConfig(labels=["1", "2", "12"])
    with pytest.raises(TemplateError, match=r"label '12' is 2 tokens for tiny:" + family):
        PromptedLM(bb, template, prompt_length=1, item_texts={"i0": "Item 0: drama"})


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prompt_training_loss_goes_down(family, backbones, toy_dataset):
    ds = limit_users(toy_dataset, 10)  # ~160 training records: 3 epochs in about a second or two
    bb = backbones(family)
    plm = PromptedLM(bb, TemplateConfig(), prompt_length=1, item_texts=_item_texts(ds))
    cfg = PromptTrainConfig(epochs=3, batch_size=32, eval_batch_size=64, patience=3, seed=0)
    res = train_prompts(plm, "rating", ds.split("train"), ds.split("valid"), ds.users, cfg, log=lambda *_: None)
    assert len(res.history) == 3
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert all(math.isfinite(h["valid_rmse"]) for h in res.history)
    assert res.prompts.shape == (10, 1, bb.hidden_size) and res.prompts.dtype == np.float32
    assert np.isfinite(res.prompts).all()
    assert list(res.users) == sorted(ds.users)
    # prompts live at the model's embedding scale (Gemma's is sqrt(d) larger than its raw weights)
    rms = float(np.sqrt(np.mean(res.prompts.astype(np.float64) ** 2)))
    assert plm.embed_rms / 3 < rms < plm.embed_rms * 3
    assert res.cost.backward_records > 0 and res.cost.forward_records > res.cost.backward_records
