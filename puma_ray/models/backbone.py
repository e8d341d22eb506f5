"""A frozen causal LM + tokenizer, loaded the way a hub id is (`from_pretrained`), and its identity.

The identity carries a fingerprint of the weights: prompts trained on one model are only meaningful to that
model, so stores and adapters record it and refuse any other.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from puma_ray.config import ModelConfig
from puma_ray.errors import ConfigError
from puma_ray.models.identity import ModelIdentity

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# elements sampled per tensor for the fingerprint: enough to tell any two trainings apart, cheap at 3B params
_FINGERPRINT_SAMPLES = 4096


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: object
    identity: ModelIdentity

    @property
    def hidden_size(self) -> int:
        return self.identity.hidden_size


def weight_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every tensor's name, shape and a strided sample of its values rounded to bfloat16.

    Rounding to bf16 makes the same weights loaded in fp32 or bf16 share a fingerprint; the strided sample keeps
    it to milliseconds for billions of parameters while any retraining still changes it.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
        sample = flat[::step][:_FINGERPRINT_SAMPLES].to(torch.bfloat16).view(torch.int16).cpu().numpy()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(sample.tobytes())
    return h.hexdigest()


def quiet_library_progress() -> None:
    """transformers' per-load "Loading weights" / "Writing model shards" bars are library chatter, not our progress:
    the console shows our own lines (what loaded, how fast)."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when torch sees a GPU, else cpu; a cuda device torch cannot see is refused here, before any
    work, with the reason (a CPU build of torch, or no visible GPU)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device {device!r}: torch {torch.__version__} sees no CUDA device "
                          "(a CPU build, or CUDA_VISIBLE_DEVICES hides the GPUs)")
    return torch.device(device)


def load_backbone(name: str, revision: str | None = None, dtype: str = "float32", seed: int = 0,
                  cache_dir: str | None = None, device: str = "cpu") -> Backbone:
    """Loads a frozen model + tokenizer from a hub id or local folder; "tiny:<family>" builds one locally first.
    The model is moved to `device` (see ModelConfig.device) after its fingerprint is taken."""
    placement = resolve_device(device)
    path = name
    if name.startswith("tiny:"):
        from puma_ray.models.tiny import ensure_tiny_model
        path = ensure_tiny_model(name.split(":", 1)[1], seed=seed, root=cache_dir)
    elif not os.path.isdir(name) and os.environ.get("HF_HUB_OFFLINE") == "1":
        # fail with the path, not a long offline-hub traceback
        raise FileNotFoundError(f"model {name!r} is not a local folder and the hub is offline (HF_HUB_OFFLINE=1)")
    quiet_library_progress()
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=DTYPES[dtype])
    model.eval()
    model.requires_grad_(False)
    cfg = model.config
    identity = ModelIdentity(
        name=name if name.startswith("tiny:") else path, family=cfg.model_type, hidden_size=cfg.hidden_size,
        fingerprint=weight_fingerprint(model), revision=revision, num_layers=cfg.num_hidden_layers,
        num_params=sum(p.numel() for p in model.parameters()))
    model.to(placement)
    return Backbone(model=model, tokenizer=tokenizer, identity=identity)


def load_model(model: ModelConfig) -> Backbone:
    """The frozen model a config names, placed on its `device`: every process that runs the model itself (the
    driver; Ray Train workers and actors load with `load_backbone` and place their own copy)."""
    return load_backbone(model.name, model.revision, model.dtype, model.seed, device=model.device)


def embedding_rms(model: PreTrainedModel, tokenizer=None) -> float:
    """RMS of what the embedding module outputs (after any family-specific scaling, e.g. Gemma's sqrt(d)).

    Prompts are placed into `inputs_embeds`, so they must live at this scale or they drown (or drown out) the
    template tokens.
    """
    emb = model.get_input_embeddings()
    n = emb.weight.shape[0]
    ids = torch.arange(0, n, max(1, n // 2048), device=emb.weight.device)
    with torch.no_grad():
        out = emb(ids).float()
    return float(out.pow(2).mean().sqrt())


def flops_per_token(identity: ModelIdentity) -> float:
    """Forward FLOPs per token, 2 x parameters (the standard estimate; attention over ~50 tokens is negligible)."""
    return 2.0 * float(identity.num_params or 0)
