"""Which model a prompt, store or adapter belongs to: name, family, width and the weights' fingerprint."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelIdentity:
    name: str  # hub id or local folder the model was loaded from
    family: str  # config.model_type
    hidden_size: int
    fingerprint: str  # backbone.weight_fingerprint: binds prompts to these exact weights
    revision: str | None = None
    num_layers: int | None = None
    num_params: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "ModelIdentity":
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})

    def describe(self) -> str:
        return f"{self.name} ({self.family}, d={self.hidden_size}, fingerprint {self.fingerprint[:12]})"
