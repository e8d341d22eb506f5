"""The migration function Phi (Eq. 2): source prompt vectors → target prompt vectors, and its saved artifact.

Architecture (METHOD.md; 88.1 M parameters at 2048 → 3072, hidden 4096): four pre-LayerNorm MLP blocks, each
LayerNorm → Linear → SiLU → Dropout → Linear:
    d_in block with a residual → up block d_in → d_t → d_t block with a residual → output block d_t → d_t
applied to each of the l prompt vectors. Aggregated migration concatenates several sources' vectors along the
feature axis (d_in = sum of the source widths). The linear baseline is one Linear(d_in, d_t), applied the same way.

Scale: each source's vectors are divided by that source's prompt RMS and the output is multiplied by the target's
embedding RMS, both fixed at fit time and saved; the network itself works at unit scale whatever the families
(Gemma's embeddings are ~40x Llama's).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import ConfigError
from .fs import StorageOptions, filesystem, join

CONFIG_FILE, WEIGHTS_FILE, HEAD_FILE = "adapter_config.json", "adapter.safetensors", "head.safetensors"


class AdapterError(ValueError):
    pass


@dataclass
class AdapterConfig:
    kind: str = "mlp"  # "mlp": the paper's adapter; "linear": the baseline that shows what non-linearity buys
    hidden: int | None = None  # MLP hidden width; None: 2 x max(d_in, d_t), as 4096 is ~2x 2048 in the paper
    dropout: float = 0.1  # the paper's

    def __post_init__(self):
        if self.kind not in ("mlp", "linear"):
            raise ConfigError(f"adapter.kind must be 'mlp' or 'linear', got {self.kind!r}")
        if self.hidden is not None and self.hidden < 1:
            raise ConfigError(f"adapter.hidden must be >= 1, got {self.hidden}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout}")


class MLPBlock(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int, dropout: float, residual: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)
        self.drop = nn.Dropout(dropout)
        self.residual = residual and d_in == d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.drop(nn.functional.silu(self.fc1(self.norm(x)))))
        return x + y if self.residual else y


class PromptAdapter(nn.Module):
    def __init__(self, source_dims: list[int], target_dim: int, cfg: AdapterConfig,
                 source_scales: list[float] | None = None, target_scale: float = 1.0):
        super().__init__()
        self.source_dims, self.target_dim, self.cfg = list(source_dims), target_dim, cfg
        d_in = sum(source_dims)
        if source_scales is not None and len(source_scales) != len(source_dims):
            raise AdapterError(f"{len(source_scales)} source scale(s) for {len(source_dims)} source(s)")
        # scales are buffers: saved with the weights, never trained
        self.register_buffer("source_scales", torch.tensor(source_scales or [1.0] * len(source_dims)))
        self.register_buffer("target_scale", torch.tensor(float(target_scale)))
        if cfg.kind == "linear":
            self.net = nn.Linear(d_in, target_dim)
        else:
            h = cfg.hidden or 2 * max(d_in, target_dim)
            self.net = nn.Sequential(
                MLPBlock(d_in, h, d_in, cfg.dropout, residual=True),
                MLPBlock(d_in, h, target_dim, cfg.dropout, residual=False),
                MLPBlock(target_dim, h, target_dim, cfg.dropout, residual=True),
                MLPBlock(target_dim, h, target_dim, cfg.dropout, residual=False),
            )

    def forward(self, *sources: torch.Tensor) -> torch.Tensor:
        """sources: one (B, l, d_s) tensor per source model, in the order of source_dims → (B, l, d_t)."""
        if len(sources) != len(self.source_dims):
            raise AdapterError(f"adapter takes {len(self.source_dims)} source(s), got {len(sources)}")
        parts = []
        for i, (x, d) in enumerate(zip(sources, self.source_dims)):
            if x.shape[-1] != d:
                raise AdapterError(f"source {i}: prompt width {x.shape[-1]}, adapter expects {d}")
            parts.append(x.to(self.source_scales.dtype) / self.source_scales[i])  # follows bf16 engines
        return self.net(torch.cat(parts, dim=-1)) * self.target_scale

    def flops_per_vector(self) -> float:
        return 2.0 * sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_adapter(folder: str, adapter: PromptAdapter, head: nn.Module, head_cfg: dict, meta: dict,
                 storage: StorageOptions | None = None) -> str:
    """adapter_config.json (architecture, dims, scales, fingerprints, training, selection, metrics, version)
    + adapter.safetensors + head.safetensors (the target head trained alongside). Config last: it marks done."""
    import os
    import tempfile
    fs, root = filesystem(folder, storage)
    fs.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # safetensors writes files; copy them through fsspec
        for name, tensors in ((WEIGHTS_FILE, adapter.state_dict()), (HEAD_FILE, head.state_dict())):
            local = os.path.join(tmp, name)
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, local)
            fs.put(local, join(root, name))
    config = {
        "format": "puma_ray.adapter/1", "package": f"puma_ray {__version__}",
        "architecture": asdict(adapter.cfg), "source_dims": adapter.source_dims, "target_dim": adapter.target_dim,
        "num_parameters": num_parameters(adapter), "head": head_cfg, **meta,
    }
    with fs.open(join(root, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=1, default=str)
    return folder


def load_adapter(folder: str, storage: StorageOptions | None = None) -> tuple[PromptAdapter, nn.Module, dict]:
    import os
    import tempfile
    from .heads import load_head
    fs, root = filesystem(folder, storage)
    if not fs.exists(join(root, CONFIG_FILE)):
        raise AdapterError(f"adapter {folder} has no {CONFIG_FILE} (incomplete or not an adapter)")
    with fs.open(join(root, CONFIG_FILE), "r") as f:
        config = json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        tensors = {}
        for name in (WEIGHTS_FILE, HEAD_FILE):
            local = os.path.join(tmp, name)
            fs.get(join(root, name), local)
            tensors[name] = load_file(local)
    adapter = PromptAdapter(config["source_dims"], config["target_dim"], AdapterConfig(**config["architecture"]))
    adapter.load_state_dict(tensors[WEIGHTS_FILE])
    adapter.eval()
    return adapter, load_head(tensors[HEAD_FILE], config["head"]), config


def check_sources(config: dict, identities: list) -> None:
    """Refuses stores whose models are not the adapter's sources (in order): their prompts mean nothing to it."""
    expected = config["sources"]
    if len(identities) != len(expected):
        raise AdapterError(f"adapter was fitted on {len(expected)} source model(s), got {len(identities)} store(s)")
    for want, got in zip(expected, identities):
        if want["fingerprint"] != got.fingerprint:
            raise AdapterError(f"adapter expects prompts of {want['name']} (fingerprint {want['fingerprint'][:12]}), "
                               f"but the store belongs to {got.describe()}")
