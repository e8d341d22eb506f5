"""The prefix cache (models/prefix_cache.py) is exact: cached = uncached label logits and prompt gradients."""
from __future__ import annotations

import pytest
import torch

from puma_ray.config import TemplateConfig
from puma_ray.models.backbone import Backbone, load_backbone
from puma_ray.models.prompted_lm import PromptedLM, TemplateError
from puma_ray.models.tiny import FAMILIES

pytestmark = pytest.mark.usefixtures("one_torch_thread", "_model_cache")  # tiny models in a test folder

# item texts of 1-7 words (mixed prefix and suffix lengths in one batch); histories of 0-3 items (CTR)
TEXTS = {f"i{k}": " ".join(f"word{j}" for j in range(k % 7 + 1)) + f" ({1990 + k})" for k in range(12)}
ITEMS = [f"i{k}" for k in range(12)]
HISTORIES = [[f"i{(3 * k + j) % 12}" for j in range(k % 4)] for k in range(12)]


def _logits_and_grad(plm: PromptedLM, prompts: torch.Tensor, histories):
    prompts = prompts.clone().requires_grad_()
    logits = plm.label_logits(prompts, plm.encode(ITEMS, histories))
    weights = torch.linspace(-1, 1, logits.shape[1], device=logits.device)
    (grad,) = torch.autograd.grad((logits * weights).sum(), prompts)
    return logits.detach(), grad


def _compare(bb: Backbone, template: TemplateConfig, histories, dtype_tol: float, **cache) -> PromptedLM:
    plain = PromptedLM(bb, template, 2, TEXTS, prefix_cache_mib=0)
    cached = PromptedLM(bb, template, 2, TEXTS, **cache)
    gen = torch.Generator().manual_seed(0)
    prompts = (torch.randn(len(ITEMS), 2, bb.hidden_size, generator=gen) * plain.embed_rms)
    prompts = prompts.to(bb.model.get_input_embeddings().weight.dtype)
    want_logits, want_grad = _logits_and_grad(plain, prompts, histories)
    for _ in range(2):  # the first batch builds the prefixes, the second only reads them
        got_logits, got_grad = _logits_and_grad(cached, prompts, histories)
        torch.testing.assert_close(got_logits, want_logits, rtol=dtype_tol, atol=dtype_tol)
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=dtype_tol, atol=dtype_tol)
    return cached


@pytest.mark.parametrize("wording", ["paper", "item_first"])
@pytest.mark.parametrize("task", ["rating", "ctr"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_equals_uncached(family, task, wording):
    bb = load_backbone(f"tiny:{family}")
    template = TemplateConfig.for_task(task, wording)
    histories = HISTORIES if task == "ctr" else None
    cached = _compare(bb, template, histories, 1e-5)
    stats = cached.prefix_cache.stats
    # one prefix for the paper's rating wording, one per item item-first, one per distinct history for CTR
    distinct = {("rating", "paper"): 1, ("rating", "item_first"): len(ITEMS),
                ("ctr", "paper"): len({tuple(h) for h in HISTORIES}), ("ctr", "item_first"): len(ITEMS)}
    assert stats.prefixes == distinct[(task, wording)] and stats.built_on_the_fly == 0
    assert stats.bytes > 0 and stats.layers == 2


def test_positions_computed_are_counted():
    bb = load_backbone("tiny:llama")
    template = TemplateConfig.for_task("rating", "item_first")
    plain, cached = (PromptedLM(bb, template, 1, TEXTS, prefix_cache_mib=m) for m in (0, 64))
    full = plain.encode(ITEMS)["tokens"]
    first, second = cached.encode(ITEMS)["tokens"], cached.encode(ITEMS)["tokens"]
    assert first == full  # every prefix built once: the same positions as the uncached batch
    suffix = sum(len(plain.sequence(i)) - plain.sequence(i).index(-1) for i in ITEMS)
    assert second == suffix < full / 4  # then only the prompt and the answer cue


def test_sliding_window_shorter_than_the_prefix():
    """Gemma3's sliding-window layers with a window of 8 tokens: prefixes and histories far longer than it."""
    from transformers import AutoModelForCausalLM
    base = load_backbone("tiny:gemma3")
    config = FAMILIES["gemma3"]()
    config.sliding_window = 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    bb = Backbone(model, base.tokenizer, base.identity)
    for task in ("rating", "ctr"):
        _compare(bb, TemplateConfig.for_task(task, "item_first"), HISTORIES if task == "ctr" else None, 1e-5)


def test_bound_reached_computes_on_the_fly():
    bb = load_backbone("tiny:phi3")
    template = TemplateConfig.for_task("rating", "item_first")
    cached = _compare(bb, template, None, 1e-5, prefix_cache_mib=1)
    cached.prefix_cache.max_bytes = 200_000  # room for a few items' prefixes only
    cached.prefix_cache._store.clear()
    cached.prefix_cache.stats.bytes = cached.prefix_cache.stats.prefixes = 0
    plain = PromptedLM(bb, template, 2, TEXTS, prefix_cache_mib=0)
    prompts = torch.randn(len(ITEMS), 2, bb.hidden_size) * plain.embed_rms
    torch.testing.assert_close(_logits_and_grad(cached, prompts, None), _logits_and_grad(plain, prompts, None),
                               rtol=1e-5, atol=1e-5)
    stats = cached.prefix_cache.stats
    assert 0 < stats.prefixes < len(ITEMS) and stats.built_on_the_fly == len(ITEMS) - stats.prefixes
    assert stats.bytes <= 200_000 and "on the fly" in stats.describe()


def test_bfloat16_within_its_tolerance():
    _compare(load_backbone("tiny:qwen2", dtype="bfloat16"), TemplateConfig.for_task("rating", "item_first"), None,
             3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_benchmark.sh)")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_equals_uncached_on_the_gpu(family):
    """The cache built and read on the GPU in bf16 (the real-model benchmark's setting), prompts from the CPU."""
    _compare(load_backbone(f"tiny:{family}", dtype="bfloat16", device="cuda"),
             TemplateConfig.for_task("rating", "item_first"), None, 3e-2)


def test_a_model_in_training_is_refused():
    from transformers import AutoModelForCausalLM
    base = load_backbone("tiny:llama")
    model = AutoModelForCausalLM.from_config(FAMILIES["llama"]())  # requires_grad: its weights would train
    plm = PromptedLM(Backbone(model, base.tokenizer, base.identity), TemplateConfig(), 1, TEXTS)
    with pytest.raises(TemplateError, match="prefix_cache_mib=0"):
        plm.encode(ITEMS)


def test_a_batch_runs_twice_the_same():
    """A forward appends its positions to an HF cache: each call builds its own from the batch's prefix."""
    bb = load_backbone("tiny:stablelm")
    plm = PromptedLM(bb, TemplateConfig.for_task("rating", "item_first"), 1, TEXTS)
    batch = plm.encode(ITEMS)
    prompts = torch.randn(len(ITEMS), 1, bb.hidden_size) * plm.embed_rms
    torch.testing.assert_close(plm.label_logits(prompts, batch), plm.label_logits(prompts, batch), rtol=0, atol=0)


def test_the_stated_size_is_the_memory_held():
    """items x layers x prefix positions x kv width x bytes: what `describe` states is what the store holds."""
    bb = load_backbone("tiny:gemma3")
    plm = PromptedLM(bb, TemplateConfig.for_task("rating", "item_first"), 1, TEXTS)
    plm.encode(ITEMS)
    stats = plm.prefix_cache.stats
    assert stats.bytes == stats.positions * stats.layers * stats.kv_width * 4  # float32
    assert stats.positions == sum(plm.sequence(i).index(-1) for i in ITEMS)
    assert f"{stats.prefixes:,} prefixes ({stats.positions:,} positions) x 2 layers" in stats.describe()
