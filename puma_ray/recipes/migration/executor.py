"""Where a migration stage's heavy work runs: the one interface both executors implement.

The stages (stages.py) hold the method: what is selected, fitted, evaluated and converted, in which order, with
which seeds and cost accounting. An executor only answers "where": `in_process.InProcess` reads the records and
the prompt matrix into this process (tests, the demo, small data; its fits may still run on Ray Train), and
`on_ray.OnRay` keeps the driver at per-user rows and the fit users' data, running every pass over all users on
Ray (Data groupbys, actor pools over store shards and record blocks, Ray Train). `recipes/engine.py` picks one
from the config's `engine` section.
"""
from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from puma_ray.artifacts.store import PromptStore
from puma_ray.config import ModelConfig, PromptTrainConfig, TemplateConfig
from puma_ray.models.backbone import Backbone

from .config import MigrateJobConfig
from .handles import FitData, Fits, Fitted, Selection, Sources, Statistics


@dataclass
class Run:
    """One migration run: its config, output folder and log."""
    cfg: MigrateJobConfig
    output: str
    log: Callable[[str], None] = print
    started: float = field(default_factory=time.perf_counter)  # the report's wall_s counts from here
    # stage -> {"status": "ran" | "reused" | "skipped", "wall_s"}: what this run did (the report's `stages`)
    stages: dict = field(default_factory=dict)
    # stages running again over their own earlier output (the ledger held a record of other settings): their
    # stores are this migration's own, and are replaced
    replacing: set = field(default_factory=set)

    def replaced(self, stage: str, cfg):
        """`cfg` (a StoreConfig or ConvertConfig) with overwrite on when `stage` replaces its own earlier output."""
        return dataclasses.replace(cfg, overwrite=True) if stage in self.replacing else cfg


@dataclass
class DataRead:
    """The records as an executor holds them, and what every stage needs to know of them."""
    records: object  # the executor's handle (Sources.records)
    task: str
    texts: dict  # item_id -> text
    num_users: int  # users with records


@dataclass
class Joined:
    users: np.ndarray  # sorted users with a prompt in every source (and records)
    prompts: object  # the executor's prompt table (Sources.prompts)
    records: object  # the records of those users only
    data: dict  # the report's data section


class Executor(ABC):
    """fit_fn: training.fit.fit_mapping's signature (this process, or Ray Train); convert_runner: a
    conversion.run.Runner (this process, or an actor pool)."""
    fit_fn: Callable
    convert_runner: Callable

    def check(self, cfg: MigrateJobConfig) -> None:
        """Raises ConfigError, one line, for a setting this executor cannot honour: before anything runs."""

    def report_fields(self) -> dict:
        """Fields the report adds for this executor."""
        return {}

    @abstractmethod
    def read_data(self, run: Run) -> DataRead: ...

    @abstractmethod
    def train_prompts(self, run: Run, name: str, model: ModelConfig, backbone: Backbone, train: PromptTrainConfig,
                      path: str, records: object, users: np.ndarray, template: TemplateConfig | None) -> dict:
        """Eq. 1: every user's prompt trained on `model` into a store at `path`, evaluated on the test split:
        {"methods": {"store": test metrics}, "cost": {"train_prompts": cost}} (a missing source, full retraining)."""

    @abstractmethod
    def join(self, run: Run, stores: list[PromptStore], data: DataRead) -> Joined: ...

    @abstractmethod
    def statistics(self, run: Run, sources: Sources) -> Statistics: ...

    @abstractmethod
    def fit_data(self, run: Run, sources: Sources, selection: Selection) -> FitData: ...

    @abstractmethod
    def evaluate_fitted(self, run: Run, sources: Sources, fits: Fits, fitted: Fitted, split: str = "test") -> dict:
        """Metrics of a fitted method over every user's records of `split`, through the target."""

    @abstractmethod
    def evaluate_source(self, run: Run, sources: Sources, i: int) -> dict:
        """Test metrics of source store i on its own model: what users have today."""

    @abstractmethod
    def reference(self, run: Run, sources: Sources) -> dict:
        """The LLM-free predictors (training.reference) fitted on the train split, on the test records."""

    def gate_sums(self, run: Run, sources: Sources, fits: Fits, target_store: str) -> pd.DataFrame | None:
        """Per-user loss sums (training/gate.user_loss_stats) of the old system (first source model + its store)
        and the new (target model + the converted store) on every user's validation records; None where this
        executor cannot run the gate yet (the stage then says so in the report)."""
        return None
