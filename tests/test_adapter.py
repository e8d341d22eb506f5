"""The adapter Phi (Eq. 2): shapes, aggregated sources, the paper's size, and its saved artifact (local and S3)."""
from __future__ import annotations

import json
import uuid

import pytest
import torch

from puma_ray import __version__
from puma_ray.artifacts.adapter_io import (
    CONFIG_FILE,
    HEAD_FILE,
    WEIGHTS_FILE,
    check_sources,
    load_adapter,
    save_adapter,
)
from puma_ray.config import ConfigError, from_dict
from puma_ray.errors import AdapterError
from puma_ray.fs import StorageOptions, filesystem
from puma_ray.models.adapter import AdapterConfig, PromptAdapter, num_parameters
from puma_ray.models.heads import RatingHead, head_config
from puma_ray.models.identity import ModelIdentity


def _identity(name: str, family: str, d: int, fp: str) -> ModelIdentity:
    return ModelIdentity(name=name, family=family, hidden_size=d, fingerprint=fp * 32, num_layers=2, num_params=99)


SRC = _identity("tiny:stablelm", "stablelm", 8, "a1")
SRC2 = _identity("tiny:phi3", "phi3", 12, "b2")
TGT = _identity("tiny:llama", "llama", 24, "c3")


def _x(b: int, l: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, l, d, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("kind", ["mlp", "linear", "mlp_skip"])
@pytest.mark.parametrize("l", [1, 3])
def test_maps_each_prompt_vector(kind, l):
    torch.manual_seed(0)
    adapter = PromptAdapter([8], 24, AdapterConfig(kind=kind, hidden=16)).eval()
    x = _x(5, l, 8)
    y = adapter(x)
    assert y.shape == (5, l, 24) and y.dtype == torch.float32 and torch.isfinite(y).all()
    # applied to each vector independently: vector j of the output depends on vector j of the input only
    for j in range(l):
        torch.testing.assert_close(adapter(x[:, j:j + 1])[:, 0], y[:, j])


def test_skip_path_is_the_mlp_plus_a_linear_map():
    """mlp_skip = the paper's MLP + Linear(d_in, d_t): with the MLP's output zeroed it is exactly a linear map."""
    torch.manual_seed(0)
    skip = PromptAdapter([8], 24, AdapterConfig(kind="mlp_skip", hidden=16), [2.0], 3.0).eval()
    x = _x(4, 2, 8)
    with torch.no_grad():
        skip.net[-1].fc2.weight.zero_()
        skip.net[-1].fc2.bias.zero_()
        expected = skip.skip(x / 2.0) * 3.0
    torch.testing.assert_close(skip(x), expected)
    assert num_parameters(skip) == num_parameters(PromptAdapter([8], 24, AdapterConfig(hidden=16))) + 8 * 24 + 24


def test_aggregated_sources_concatenate():
    torch.manual_seed(0)
    adapter = PromptAdapter([8, 12, 16], 24, AdapterConfig(hidden=32)).eval()
    assert adapter.net[0].fc1.in_features == 36  # d_in = 8 + 12 + 16
    a, b, c = _x(4, 2, 8, 1), _x(4, 2, 12, 2), _x(4, 2, 16, 3)
    y = adapter(a, b, c)
    assert y.shape == (4, 2, 24)
    # every source matters
    assert not torch.allclose(y, adapter(a, b, c + 1))
    assert not torch.allclose(y, adapter(a + 1, b, c))


def test_wrong_inputs_refused():
    adapter = PromptAdapter([8, 12], 24, AdapterConfig(hidden=16))
    with pytest.raises(AdapterError, match=r"takes 2 source\(s\), got 1"):
        adapter(_x(2, 1, 8))
    with pytest.raises(AdapterError, match=r"takes 2 source\(s\), got 3"):
        adapter(_x(2, 1, 8), _x(2, 1, 12), _x(2, 1, 12))
    with pytest.raises(AdapterError, match="source 1: prompt width 8, adapter expects 12"):
        adapter(_x(2, 1, 8), _x(2, 1, 8))
    with pytest.raises(AdapterError, match="source 0: prompt width 12, adapter expects 8"):
        adapter(_x(2, 1, 12), _x(2, 1, 8))


def test_scales_are_fixed_buffers():
    """Inputs are divided by each source's RMS and the output multiplied by the target's: x*s maps like x."""
    torch.manual_seed(0)
    plain = PromptAdapter([8], 6, AdapterConfig(hidden=16)).eval()
    scaled = PromptAdapter([8], 6, AdapterConfig(hidden=16), source_scales=[2.0], target_scale=3.0).eval()
    scaled.load_state_dict({**plain.state_dict(), "source_scales": torch.tensor([2.0]),
                            "target_scale": torch.tensor(3.0)})
    x = _x(3, 1, 8)
    torch.testing.assert_close(scaled(2 * x), 3 * plain(x))
    trainable = {n for n, _ in scaled.named_parameters()}
    assert "source_scales" not in trainable and "target_scale" not in trainable
    assert {"source_scales", "target_scale"} <= set(scaled.state_dict())


# ---------------------------------------------------------------------------------------------- size
def test_paper_size():
    with torch.device("meta"):  # count without allocating 350 MB
        adapter = PromptAdapter([2048], 3072, AdapterConfig(hidden=4096))
    n = num_parameters(adapter)
    assert n == 88_128_512
    assert round(n / 1e6, 1) == 88.1  # the paper's "88.1M"
    assert adapter.flops_per_vector() == pytest.approx(2 * (n - sum(
        p.numel() for name, p in adapter.named_parameters() if "norm" in name or name.endswith("bias"))))


def test_default_hidden_and_linear_size():
    adapter = PromptAdapter([8, 12], 24, AdapterConfig())
    assert adapter.net[0].fc1.out_features == 2 * max(20, 24)
    for d_in, d_t in ((8, 24), (20, 24), (48, 64)):
        linear = PromptAdapter([d_in], d_t, AdapterConfig(kind="linear"))
        assert num_parameters(linear) == d_in * d_t + d_t
    assert num_parameters(PromptAdapter([8, 12], 24, AdapterConfig(kind="linear"))) == 20 * 24 + 24


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "conv"}, r"adapter.kind must be one of \['mlp', 'linear', 'mlp_skip'\], got 'conv'"),
    ({"hidden": 0}, "adapter.hidden must be >= 1"),
    ({"dropout": 1.0}, r"adapter.dropout must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"adapter.dropout must be in \[0, 1\)"),
])
def test_adapter_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(AdapterConfig, kwargs, "adapter")


# ---------------------------------------------------------------------------------------------- artifact
def _trained_pair(source_dims=(8, 12)):
    torch.manual_seed(1)
    adapter = PromptAdapter(list(source_dims), 24, AdapterConfig(hidden=16, dropout=0.3),
                            source_scales=[0.5, 2.0][:len(source_dims)], target_scale=1.7)
    head = RatingHead()
    with torch.no_grad():  # not the initial weights: a round trip of defaults would prove nothing
        for p in [*adapter.parameters(), *head.parameters()]:
            p.add_(torch.randn_like(p) * 0.1)
    meta = {"sources": [vars(SRC), vars(SRC2)][:len(source_dims)], "target": vars(TGT), "prompt_length": 2,
            "task": "rating"}
    return adapter, head, meta


def _check_round_trip(folder, storage=None):
    adapter, head, meta = _trained_pair()
    save_adapter(folder, adapter, head, head_config("rating", head), meta, storage)
    loaded, loaded_head, config = load_adapter(folder, storage)

    assert not loaded.training  # loaded for inference
    assert loaded.source_dims == [8, 12] and loaded.target_dim == 24 and loaded.cfg == adapter.cfg
    adapter.eval()
    a, b = _x(6, 2, 8), _x(6, 2, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(a, b), adapter(a, b), rtol=0, atol=0)
        logits = torch.randn(9, 5)
        torch.testing.assert_close(loaded_head(logits), head(logits), rtol=0, atol=0)
    for k, v in adapter.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)

    assert config["format"] == "puma_ray.adapter/1"
    assert config["package"] == f"puma_ray {__version__}"
    assert config["source_dims"] == [8, 12] and config["target_dim"] == 24
    assert [s["fingerprint"] for s in config["sources"]] == [SRC.fingerprint, SRC2.fingerprint]
    assert [s["name"] for s in config["sources"]] == ["tiny:stablelm", "tiny:phi3"]
    assert config["target"]["fingerprint"] == TGT.fingerprint and config["target"]["hidden_size"] == 24
    assert config["architecture"] == {"kind": "mlp", "hidden": 16, "dropout": 0.3}
    assert config["num_parameters"] == num_parameters(adapter)
    assert config["head"] == head_config("rating", head)
    check_sources(config, [SRC, SRC2])  # the right stores pass
    return config


def test_round_trip_local(tmp_path):
    folder = str(tmp_path / "adapter")
    _check_round_trip(folder)
    raw = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert raw["source_dims"] == [8, 12]
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, HEAD_FILE}


def test_round_trip_s3(s3_server):
    folder = f"s3://{s3_server['bucket']}/adapters/{uuid.uuid4().hex[:10]}"
    storage = StorageOptions(endpoint_url=s3_server["endpoint_url"], key=s3_server["key"],
                             secret=s3_server["secret"], region="us-east-1")
    _check_round_trip(folder, storage)
    fs, root = filesystem(folder, storage)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, refresh=True))
    assert names == sorted([CONFIG_FILE, WEIGHTS_FILE, HEAD_FILE])  # really in the bucket


def test_load_refuses_incomplete(tmp_path):
    adapter, head, meta = _trained_pair()
    folder = tmp_path / "adapter"
    save_adapter(str(folder), adapter, head, head_config("rating", head), meta)
    (folder / CONFIG_FILE).unlink()  # the config is written last: without it the artifact is incomplete
    with pytest.raises(AdapterError, match=f"has no {CONFIG_FILE}"):
        load_adapter(str(folder))
    with pytest.raises(AdapterError, match=f"has no {CONFIG_FILE}"):
        load_adapter(str(tmp_path / "nothing"))


@pytest.mark.parametrize("format_id", ["puma_ray.adapter/2", None, "puma-foundation/2"])
def test_load_refuses_unknown_format(tmp_path, format_id):
    """A newer version, a config without a format, another artifact's config: one line naming the file."""
    adapter, head, meta = _trained_pair()
    folder = tmp_path / "adapter"
    save_adapter(str(folder), adapter, head, head_config("rating", head), meta)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["format"] = format_id
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    expected = rf"adapter {folder} \({CONFIG_FILE}\): format .* is not one this package reads"
    with pytest.raises(AdapterError, match=expected) as e:
        load_adapter(str(folder))
    assert "\n" not in str(e.value)


def test_load_refuses_garbage_config(tmp_path):
    adapter, head, meta = _trained_pair()
    folder = tmp_path / "adapter"
    save_adapter(str(folder), adapter, head, head_config("rating", head), meta)
    (folder / CONFIG_FILE).write_bytes(b"\x1f\x8b not json")
    with pytest.raises(AdapterError, match="is not valid JSON"):
        load_adapter(str(folder))


def test_check_sources_refuses_other_models():
    _, _, meta = _trained_pair(source_dims=(8,))
    check_sources(meta, [SRC])
    # same name and width, other weights (e.g. a retrained checkpoint): refused, naming both models
    other = _identity("tiny:llama", "llama", 8, "ff")
    with pytest.raises(AdapterError) as err:
        check_sources(meta, [other])
    msg = str(err.value)
    assert "tiny:stablelm" in msg and SRC.fingerprint[:12] in msg  # what the adapter expects
    assert "tiny:llama" in msg and other.fingerprint[:12] in msg  # what it got
    with pytest.raises(AdapterError, match=r"fitted on 1 source model\(s\), got 2 store\(s\)"):
        check_sources(meta, [SRC, SRC])
    # aggregated: order matters (the concatenation is positional)
    _, _, meta2 = _trained_pair()
    with pytest.raises(AdapterError, match="expects prompts of tiny:stablelm"):
        check_sources(meta2, [SRC2, SRC])


def test_an_adapter_from_before_the_rename_still_loads_and_converts(tmp_path):
    """Adapters written before the config file was renamed (adapter_config.json: PEFT's name, another schema)
    load and convert as they are; new ones are written as puma_adapter.json only."""
    from puma_ray.artifacts.formats import ADAPTER_CONFIG_LEGACY
    from puma_ray.conversion.run import ConvertConfig, convert
    from puma_ray.tools.synthetic_prompts import write_synthetic_adapter, write_synthetic_store

    adapter, head, meta = _trained_pair()
    folder = tmp_path / "adapter"
    save_adapter(str(folder), adapter, head, head_config("rating", head), meta)
    assert CONFIG_FILE == "puma_adapter.json" and not (folder / ADAPTER_CONFIG_LEGACY).exists()
    (folder / CONFIG_FILE).rename(folder / ADAPTER_CONFIG_LEGACY)
    loaded, _, config = load_adapter(str(folder))
    assert config["source_dims"] == [8, 12]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), adapter.state_dict().values()))

    source = write_synthetic_store(str(tmp_path / "source"), 30, 2, 8, 10)
    old = write_synthetic_adapter(str(tmp_path / "old"), [8], 12, 2, hidden=8)
    (tmp_path / "old" / CONFIG_FILE).rename(tmp_path / "old" / ADAPTER_CONFIG_LEGACY)
    summary = convert(old, [source], str(tmp_path / "target"), ConvertConfig(progress=False), log=lambda *_: None)
    assert summary["users"] == 30 and summary["rejected"] == 0
