"""Tiny random causal LMs of five families, written to a folder that `from_pretrained` loads like a hub id.

They carry no knowledge: they exercise every family's real HF classes (embedding scaling, attention variants,
norms) in tests and in the default demo, on 2 CPU cores. Hidden sizes differ on purpose, so a migration between
two of them really changes width.
"""
from __future__ import annotations

import json
import os

import fsspec
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    StableLmConfig,
)

from puma_ray.fs import write_file

VOCAB_SIZE = 1024  # upper bound for byte-level BPE: any text encodes, template words become single tokens
SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# one small config per family: 2 layers, different widths (so d_s != d_t across families)
_COMMON = dict(vocab_size=VOCAB_SIZE, num_hidden_layers=2, max_position_embeddings=512, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": lambda: LlamaConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=False, **_COMMON),
    "qwen2": lambda: Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True, **_COMMON),
    # Gemma scales input embeddings by sqrt(d) inside its embedding module: the case prompts must respect
    "gemma3": lambda: Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                       num_key_value_heads=1, head_dim=16, sliding_window=64,
                                       layer_types=["sliding_attention", "full_attention"], **_COMMON),
    "phi3": lambda: Phi3Config(hidden_size=80, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4,
                               **_COMMON),
    "stablelm": lambda: StableLmConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                       num_key_value_heads=4, **_COMMON),
}


def _corpus() -> list[str]:
    """Fixed training text for the tokenizer: the task templates, digits and the CTR answers, many times over."""
    from puma_ray.tasks import CTR_TEMPLATE, RATING_TEMPLATE
    base = [RATING_TEMPLATE, CTR_TEMPLATE, "1 2 3 4 5", "Yes No", "Yes", "No",
            "The quick brown fox jumps over the lazy dog. Action Comedy Drama Romance Thriller Horror Sci-Fi "
            "Documentary Children's Animation Crime Adventure War Musical Mystery Western Fantasy Film-Noir",
            "news sports politics finance health travel music movie story world business science technology"]
    return base * 50


def build_tokenizer(extra_texts: list[str] | None = None, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) trained on the templates, plus `extra_texts` (a foundation's item texts,
    so that most title words become single tokens the model can learn as items)."""
    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values())[:3] + ["<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # item texts as the template sees them (" " + text): the merges then match what encoding produces
    tok.train_from_iterator(_corpus() + [" " + t for t in (extra_texts or [])], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.padding_side = "left"
    return fast


def family_config(family: str, hidden_size: int, layers: int, vocab_size: int, heads: int = 4):
    """`family`'s config at another width/depth (a foundation model), keeping each family's quirks: Qwen2's tied
    embeddings, Gemma3's sliding + full attention layers and sqrt(d) embedding scale, grouped-query attention."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    if hidden_size % heads:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of {heads} attention heads")
    config = FAMILIES[family]()
    config.vocab_size, config.hidden_size, config.intermediate_size = vocab_size, hidden_size, 2 * hidden_size
    config.num_hidden_layers, config.num_attention_heads = layers, heads
    if family == "gemma3":
        config.head_dim = hidden_size // heads
        config.layer_types = [("sliding_attention" if (i + 1) % 2 else "full_attention") for i in range(layers)]
    elif getattr(config, "layer_types", None) is not None:  # one entry per layer, or the config will not save
        config.layer_types = [config.layer_types[0]] * layers
    factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor") or 1.0
    rotary = int(hidden_size // heads * factor)
    if rotary % 2:  # StableLM rotates a quarter of each head: that part must have an even size
        raise ValueError(f"{family}: head size {hidden_size // heads} leaves an odd rotary size {rotary}; "
                         "choose hidden_size / heads as a multiple of 8")
    if getattr(config, "num_key_value_heads", None) and heads % config.num_key_value_heads:
        config.num_key_value_heads = heads
    return config


def write_tiny_model(family: str, folder: str, seed: int = 0) -> str:
    """Builds a random model of `family` from its transformers config and saves model + tokenizer to `folder`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; known: {sorted(FAMILIES)}")
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    model = AutoModelForCausalLM.from_config(config)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    write_file(fsspec.filesystem("file"), os.path.join(folder, "tiny_model.json"),  # last, atomically
               json.dumps({"family": family, "seed": seed, "made_by": "puma_ray.models.tiny"}).encode())
    return folder


def default_root() -> str:
    return os.environ.get("PUMA_MODEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "puma_ray", "models"))


def ensure_tiny_model(family: str, seed: int = 0, root: str | None = None) -> str:
    """Path of tiny:<family> (seed), written once and reused: same seed, same weights, same fingerprint."""
    folder = os.path.join(root or default_root(), f"tiny-{family}-seed{seed}")
    if not os.path.exists(os.path.join(folder, "tiny_model.json")):
        tmp = f"{folder}.tmp{os.getpid()}"
        write_tiny_model(family, tmp, seed)
        try:
            os.replace(tmp, folder)  # atomic: concurrent workers never see half a model
        except OSError:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its copy is identical
    return folder
