"""The migration function Phi (Eq. 2): source prompt vectors → target prompt vectors (saved by artifacts/adapter_io).

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

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from puma_ray.config import ConfigError
from puma_ray.errors import AdapterError


@dataclass
class AdapterConfig:
    # "mlp": the paper's adapter; "linear": the baseline that shows what non-linearity buys; "mlp_skip": the
    # paper's MLP plus a linear path around it, so the fit starts from (and can stay at) what a linear map does
    kind: Literal["mlp", "linear", "mlp_skip"] = "mlp"
    hidden: int | None = None  # MLP hidden width; None: 2 x max(d_in, d_t), as 4096 is ~2x 2048 in the paper
    dropout: float = 0.1  # the paper's

    def __post_init__(self):
        if self.hidden is not None and self.hidden < 1:
            raise ConfigError(f"adapter.hidden must be >= 1, got {self.hidden}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout}")


def parse_adapter_spec(spec: str) -> dict:
    """`kind[:hidden]` (a sweep's adapter dimension: "mlp", "mlp:64", "mlp_skip", "linear") → AdapterConfig fields;
    a bad spec is one ConfigError naming it."""
    kind, _, hidden = str(spec).partition(":")
    if kind not in ("mlp", "linear", "mlp_skip"):
        raise ConfigError(f"adapter {spec!r}: kind must be mlp, mlp_skip or linear (optionally :<hidden width>)")
    if hidden and (kind == "linear" or not hidden.isdigit() or int(hidden) < 1):
        raise ConfigError(f"adapter {spec!r}: the hidden width is a positive integer after an mlp kind")
    return {"kind": kind, "hidden": int(hidden) if hidden else None}


def adapter_spec(cfg: AdapterConfig) -> str:
    """The inverse of parse_adapter_spec (dropout is not part of a spec)."""
    return cfg.kind if cfg.hidden is None or cfg.kind == "linear" else f"{cfg.kind}:{cfg.hidden}"


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
                 source_scales: list[float] | None = None, target_scale: float = 1.0, seed: int | None = None):
        """seed: the initial weights' seed (None: torch's global state, whatever ran before in the process; a
        recipe always passes one, so a run's numbers do not depend on what was imported or trained first)."""
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
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
        # the linear path of "mlp_skip" (None otherwise: the paper's and the linear adapters keep their weights)
        self.skip = nn.Linear(d_in, target_dim) if cfg.kind == "mlp_skip" else None

    def forward(self, *sources: torch.Tensor) -> torch.Tensor:
        """sources: one (B, l, d_s) tensor per source model, in the order of source_dims → (B, l, d_t)."""
        if len(sources) != len(self.source_dims):
            raise AdapterError(f"adapter takes {len(self.source_dims)} source(s), got {len(sources)}")
        parts = []
        for i, (x, d) in enumerate(zip(sources, self.source_dims)):
            if x.shape[-1] != d:
                raise AdapterError(f"source {i}: prompt width {x.shape[-1]}, adapter expects {d}")
            parts.append(x.to(self.source_scales.dtype) / self.source_scales[i])  # follows bf16 engines
        x = torch.cat(parts, dim=-1)
        y = self.net(x) if self.skip is None else self.net(x) + self.skip(x)
        return y * self.target_scale

    def flops_per_vector(self) -> float:
        return 2.0 * sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
