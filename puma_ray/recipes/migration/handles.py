"""What the stages hand each other: small typed records of handles (store paths and indexes, record files or
frames, per-user arrays), never a promise that everything is in memory. Where a field is an executor's own handle
(`Sources.records`, `Sources.prompts`), only that executor reads it; the stages read the rest."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from puma_ray.artifacts.store import PromptStore
from puma_ray.config import TemplateConfig
from puma_ray.models.backbone import Backbone
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.selection.strategies import SelectionInput
from puma_ray.training.cost import Cost
from puma_ray.training.fit import FitResult


@dataclass
class Sources:
    """The data and the source store(s) joined on user_id: `users` (sorted) are the users every later stage sees."""
    task: str
    metric: str
    template: TemplateConfig
    l: int
    texts: dict  # item_id -> text: every prompted forward needs them
    stores: list[PromptStore]
    backbones: list[Backbone]  # one per source, the model each store is bound to
    users: np.ndarray
    prompts: object  # the executor's prompt table: in memory (JoinedSources) or store indexes (StoreIndex list)
    records: object  # the executor's records: a Dataset, or record files + per-user rows
    head: tuple[dict, dict]  # the first source's head (state, config): a fit's starting head
    data: dict  # what the report says of the data
    reports: dict = field(default_factory=dict)  # store path -> report of its training, for stores trained here


@dataclass
class Statistics:
    """The per-user features the selection strategy reads, what computing them cost, and each source's prompt
    scale (what the adapters are built with)."""
    inputs: SelectionInput
    cost: Cost
    scales: list[float]


@dataclass
class Selection:
    budget: int
    chosen: np.ndarray  # indices into Sources.users: the training users
    valid_idx: np.ndarray  # held-out validation users (early stopping)
    fit_idx: np.ndarray  # chosen ∪ valid_idx: the rows of the fit's prompt inputs
    cost: Cost  # the statistics' cost plus the selection's own wall

    def fit_users(self, users: np.ndarray) -> np.ndarray:
        return users[self.fit_idx]


@dataclass
class FitData:
    """Only the fit users' data: their prompts (per source, aligned with `users`) and records."""
    users: np.ndarray
    inputs: list[np.ndarray]
    train: object  # pd.DataFrame: train records of the chosen users
    valid: object  # pd.DataFrame: valid records of the validation users


@dataclass
class Fitted:
    """One fitted method. `adapter` is its saved artifact (None for fixed prompts, which have no adapter);
    `prompts` the all-users prompt table of a fixed-prompts method (random_init), None for an adapter."""
    result: FitResult
    adapter: str | None = None
    prompts: list[np.ndarray] | None = None
    meta: dict = field(default_factory=dict)  # what the adapter artifact says of its fit (adapter_config.json)


@dataclass
class Fits:
    target: Backbone
    plm: PromptedLM  # the frozen target with the template
    data: FitData
    methods: dict[str, Fitted]  # "puma", then the fitted baselines


@dataclass
class Baselines:
    methods: dict[str, Fitted]  # fitted baselines: linear, random_init
    full_retrain: dict | None = None  # Eq. 1 report of the target store trained from scratch (methods, cost)


@dataclass
class Evaluation:
    methods: dict  # method -> test metrics, in report order
    reference: dict  # the LLM-free predictors on the same test records


@dataclass
class Conversion:
    target_store: str
    summary: dict  # conversion.run.convert's summary
    choice: dict = field(default_factory=dict)  # which adapter converted everyone, and the validation figures


@dataclass
class Gate:
    """The per-user gate's outcome: report.json's `gate` section (counts, rule, worst users, the table's path), or
    why it did not run."""
    summary: dict
