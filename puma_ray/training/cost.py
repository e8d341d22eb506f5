"""What a stage spent: wall time, records and tokens through the LLM (forward, backward), estimated FLOPs."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Cost:
    """What a stage spent: wall time, records through the LLM (forward, backward), estimated FLOPs."""
    wall_s: float = 0.0
    forward_records: int = 0
    backward_records: int = 0
    tokens_forward: int = 0
    tokens_backward: int = 0
    flops_per_token: float = 0.0  # 2 x LLM parameters
    extra_flops: float = 0.0  # adapter / head work, small but counted
    # of wall_s, the part before any work (Ray Train: placing workers, loading the model in each): reported apart,
    # so that a cost ratio compares work with work (a ~30-85 s start-up on 2 cores dwarfs a small fit)
    startup_s: float = 0.0

    def add_batch(self, batch, tokens: int, backward: bool) -> None:
        self.forward_records += len(batch)
        self.tokens_forward += tokens
        if backward:
            self.backward_records += len(batch)
            self.tokens_backward += tokens

    @property
    def llm_record_passes(self) -> int:
        return self.forward_records + self.backward_records

    @property
    def flops(self) -> float:
        # backward through a frozen LLM computes activation gradients only (no weight gradients): ~1x forward
        return self.flops_per_token * (self.tokens_forward + self.tokens_backward) + self.extra_flops

    def merge(self, other: "Cost") -> "Cost":
        return Cost(self.wall_s + other.wall_s, self.forward_records + other.forward_records,
                    self.backward_records + other.backward_records, self.tokens_forward + other.tokens_forward,
                    self.tokens_backward + other.tokens_backward, max(self.flops_per_token, other.flops_per_token),
                    self.extra_flops + other.extra_flops, self.startup_s + other.startup_s)

    def to_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 3), "startup_s": round(self.startup_s, 3),
                "work_s": round(self.wall_s - self.startup_s, 3), "llm_record_passes": self.llm_record_passes,
                "forward_records": self.forward_records, "backward_records": self.backward_records,
                "flops": float(self.flops)}

    def state(self) -> dict:
        """Every counter, JSON-able: what a Ray Train checkpoint carries (`Cost(**state)` restores it)."""
        return asdict(self)
