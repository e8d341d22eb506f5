"""A migration's config: the sources, the target, and the settings of every stage (stages.py runs them)."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

from puma_ray.config import (
    ConfigError,
    DataConfig,
    EngineConfig,
    ModelConfig,
    PromptTrainConfig,
    StoreConfig,
    TemplateConfig,
)
from puma_ray.conversion.run import ConvertConfig
from puma_ray.data import Dataset, load_dataset
from puma_ray.fs import StorageOptions
from puma_ray.models.adapter import AdapterConfig, parse_adapter_spec
from puma_ray.selection.strategies import STRATEGIES
from puma_ray.training.fit import FitConfig
from puma_ray.training.gate import GateConfig


@dataclass
class SourceConfig:
    store: str  # source store path (local or s3://); "{output}" expands to the run folder
    model: ModelConfig = field(default_factory=ModelConfig)
    prepare: PromptTrainConfig | None = None  # store missing: train it first with these settings (demo, benchmarks)


@dataclass
class SelectionConfig:
    CHOICES: typing.ClassVar[dict] = {"strategy": lambda: sorted(STRATEGIES)}
    strategy: str = "kmeans_variance"  # PUMA; any name in selection.STRATEGIES
    k: int = 15  # the paper's K
    budget: float = 0.1  # users to fit on: a count (>= 1) or a fraction of all users
    valid_users: float = 0.1  # held-out users whose valid records drive early stopping (count or fraction)
    seed: int = 0  # K-means init, the binned draws and the validation users: one seed, one selection
    kmeans_sample: int = 100_000  # above this many users, mini-batch K-means on a sample (1M x 2048 stays cheap)
    pca_components: int = 32  # "pca" strategies: prompts projected to this many components before clustering
    loss_records_per_user: int = 16  # the per-user loss only ranks users: a sample of records suffices
    global_bins: int = 8  # variance/loss bucketing: the original's 8 bins
    cluster_bins: int = 5  # within-cluster bins: the original's 5

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"selection.strategy {self.strategy!r} unknown; known: {sorted(STRATEGIES)}")
        if self.k < 1:
            raise ConfigError(f"selection.k must be >= 1, got {self.k}")


@dataclass
class BaselinesConfig:
    source: bool = True  # the source store on the source model: what users have today
    random_init: bool = True  # random target prompts, head trained on the same users: the floor
    linear: bool = True  # one linear map d_s → d_t: what the non-linear adapter buys
    # more adapters fitted like the linear map, as `kind[:hidden]` ("mlp_skip", "mlp:32"): each is tested, and
    # `ship: validation` weighs it beside PUMA and the linear map; none by default (each costs one more fit)
    candidates: list[str] = field(default_factory=list)
    full_retrain: bool = False  # every prompt retrained on the target: the (expensive) upper bound
    full_retrain_train: PromptTrainConfig = field(default_factory=PromptTrainConfig)
    # "engine": baseline fits run where PUMA's does; "local": in the driver process (a small demo skips three
    # Ray Train start-ups; on a GPU cluster keep "engine", the driver has no GPU)
    fits_on: Literal["engine", "local"] = "engine"

    def __post_init__(self):
        if not isinstance(self.candidates, list) or len(set(map(str, self.candidates))) != len(self.candidates):
            raise ConfigError(f"baselines.candidates: a list of distinct adapter specs, got {self.candidates!r}")
        for spec in self.candidates:
            parse_adapter_spec(spec)


def candidate_name(spec: str) -> str:
    """A candidate adapter's method name in reports and the ledger: `adapter_mlp_32` for "mlp:32"."""
    return "adapter_" + str(spec).replace(":", "_")


@dataclass
class MigrateJobConfig:
    sources: list[SourceConfig] = field(default_factory=list)  # one per source model; several = aggregated migration
    target: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    template: TemplateConfig | None = None  # None: the first source store's template
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # which fitted adapter converts everyone: "validation" (the best of PUMA, the linear map and baselines.candidates
    # on every user's validation records: never ships worse than the simplest map by what it may look at) or "puma"
    # (the paper's)
    ship: Literal["validation", "puma"] = "validation"
    fit: FitConfig = field(default_factory=FitConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    storage: StorageOptions = field(default_factory=StorageOptions)
    target_store: str = "{output}/target-store"  # where the conversion writes every user's new prompt
    adapter_path: str = "{output}/adapter"  # the fitted PUMA adapter (what jobs/convert.py --adapter takes)
    # a user absent from one source: "error", or "reject" (counted, listed)
    sources_missing_policy: Literal["error", "reject"] = "error"
    convert: ConvertConfig = field(default_factory=ConvertConfig)  # the last stage: every user → the target store
    engine: EngineConfig = field(default_factory=EngineConfig)
    # after conversion: each user's old system against the new on their own validation records (training/gate.py)
    gate: GateConfig = field(default_factory=GateConfig)
    threads: int | None = None  # torch threads in this process; None: torch's default (all cores)

    def __post_init__(self):
        if not self.sources:
            raise ConfigError("sources: at least one source store is needed")


def resolve_foundations(cfg: MigrateJobConfig, log=print, ds: Dataset | None = None) -> MigrateJobConfig:
    """The config with every `foundation:<family>` model replaced by its pretrained local folder (pretrained on the
    train split first when not cached). A no-op, reading no data, when no model is a foundation; run it before the
    Ray layer is built, so that Train workers load the same folder."""
    from puma_ray.recipes.foundation import is_foundation, resolve_model
    if not any(is_foundation(m.name) for m in [cfg.target, *(s.model for s in cfg.sources)]):
        return cfg
    ds = ds or load_dataset(cfg.data, cfg.storage)

    def resolve(model: ModelConfig) -> ModelConfig:
        return resolve_model(model, ds, cfg.template, log)

    sources = [dataclasses.replace(s, model=resolve(s.model)) for s in cfg.sources]
    return dataclasses.replace(cfg, sources=sources, target=resolve(cfg.target))
