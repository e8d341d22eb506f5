"""The in-process executor: the records table and the prompt matrix live in this process (tests, the demo, data
that fits in memory). Its heavy parts can still leave it: `fit_fn` may be a Ray Train fit, `variance_fn` a Ray
Data aggregation and `convert_runner` an actor pool (engine.kind ray with engine.driver full)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from puma_ray.artifacts.store import PromptStore, StoreError, prompt_scale
from puma_ray.config import ModelConfig, PromptTrainConfig, TemplateConfig
from puma_ray.conversion.run import JoinedSources, join_sources, run_locally
from puma_ray.data import Dataset, load_dataset
from puma_ray.models.backbone import Backbone
from puma_ray.models.heads import load_head
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.recipes.train_prompts import TrainPromptsJobConfig, item_texts, train_store
from puma_ray.selection.statistics import ffn_features, label_variance, source_loss
from puma_ray.selection.strategies import NEEDS, SelectionInput
from puma_ray.training.cost import Cost
from puma_ray.training.evaluate import evaluate
from puma_ray.training.fit import fit_mapping, mapped_prompts
from puma_ray.training.gate import System, system_loss_sums
from puma_ray.training.records import RecordSet
from puma_ray.training.reference import reference_metrics

from .config import SelectionConfig
from .executor import DataRead, Executor, Joined, Run
from .handles import FitData, Fits, Fitted, Selection, Sources, Statistics


def prompt_rms(prompts: np.ndarray) -> float:
    return prompt_scale(prompts)


def user_statistics(cfg: SelectionConfig, needs, joined: JoinedSources, ds: Dataset, source_plm, source_head, task,
                    variance_fn=label_variance) -> tuple[SelectionInput, dict]:
    """The per-user features named in `needs` ("variance", "loss", "ffn"), and {feature: Cost} of computing each
    (a sweep computes the union over its strategies once and charges each strategy what it reads)."""
    flat = np.concatenate([p.reshape(len(p), -1) for p in joined.prompts], axis=1)
    inputs = SelectionInput(joined.users, flat, options={k: getattr(cfg, k) for k in (
        "kmeans_sample", "pca_components", "global_bins", "cluster_bins")})
    costs = {}
    if "variance" in needs:
        inputs.variance = variance_fn(ds.split("train"), joined.users)
    if "loss" in needs:
        inputs.loss, costs["loss"] = source_loss(source_plm, source_head, task, joined.prompts[0], ds.split("train"),
                                                 joined.users, cfg.loss_records_per_user, seed=cfg.seed)
    if "ffn" in needs:
        inputs.ffn, costs["ffn"] = ffn_features(source_plm, joined.prompts[0])
    return inputs, costs


def statistics_cost(costs: dict, strategy: str) -> Cost:
    """What the features `strategy` reads cost, out of user_statistics' {feature: Cost}."""
    total = Cost()
    for need in NEEDS[strategy]:
        if need in costs:
            total = total.merge(costs[need])
    return total


def fit_records(ds: Dataset, users: np.ndarray, chosen: np.ndarray, valid_idx: np.ndarray):
    """(train records of the chosen users, valid records of the validation users)."""
    train, valid = ds.split("train"), ds.split("valid")
    return train[train["user_id"].isin(users[chosen])], valid[valid["user_id"].isin(users[valid_idx])]


def source_plm(sources: Sources, i: int, model: ModelConfig) -> PromptedLM:
    return PromptedLM(sources.backbones[i], sources.template, sources.l, sources.texts, model.prefix_cache_mib)


class InProcess(Executor):
    def __init__(self, fit_fn=fit_mapping, variance_fn=label_variance, convert_runner=run_locally):
        self.fit_fn, self.variance_fn, self.convert_runner = fit_fn, variance_fn, convert_runner

    def read_data(self, run: Run) -> DataRead:
        ds = load_dataset(run.cfg.data, run.cfg.storage)
        run.log(f"data {ds.summary()}")
        return DataRead(ds, ds.task, item_texts(ds), int(ds.records["user_id"].nunique()))

    def train_prompts(self, run: Run, name: str, model: ModelConfig, backbone: Backbone, train: PromptTrainConfig,
                      path: str, records: Dataset, users: np.ndarray, template: TemplateConfig | None) -> dict:
        cfg = run.cfg
        job = TrainPromptsJobConfig(model=model, data=cfg.data, template=template, train=train, store=cfg.store,
                                    storage=cfg.storage)
        report, _ = train_store(job, records, path, log=lambda m: run.log("  " + m))
        return report

    def join(self, run: Run, stores: list[PromptStore], data: DataRead) -> Joined:
        cfg, ds = run.cfg, data.records
        joined = join_sources(stores, cfg.sources_missing_policy, cfg.convert.max_prompt_scale)
        for path, users in joined.out_of_scale.items():  # left out of everything but the conversion's rejects
            run.log(f"source {path}: {len(users)} user(s) with an out-of-scale prompt (e.g. {users[0]!r}) left out "
                    "of selection, fit and evaluation; the conversion rejects them with the reason")
            ds = Dataset(ds.records[~ds.records["user_id"].isin(users)], ds.items, ds.task, ds.name, ds.provenance)
        record_users = np.unique(ds.records["user_id"].to_numpy(dtype=str))  # str, not object: O(n log n) set ops
        without_prompt = np.setdiff1d(record_users, joined.users)
        if len(without_prompt):
            if cfg.sources_missing_policy == "error":
                raise StoreError(f"user {without_prompt[0]!r} has records but no prompt in the source store(s) "
                                 f"({len(without_prompt)} user(s) in all)")
            ds = Dataset(ds.records[ds.records["user_id"].isin(joined.users)], ds.items, ds.task, ds.name,
                         ds.provenance)
        return Joined(joined.users, joined, ds, ds.summary())

    def statistics(self, run: Run, sources: Sources) -> Statistics:
        sel, joined = run.cfg.selection, sources.prompts
        inputs, costs = user_statistics(sel, NEEDS[sel.strategy], joined, sources.records,
                                        source_plm(sources, 0, run.cfg.sources[0].model), load_head(*sources.head),
                                        sources.task, self.variance_fn)
        return Statistics(inputs, statistics_cost(costs, sel.strategy), [prompt_rms(p) for p in joined.prompts])

    def fit_data(self, run: Run, sources: Sources, selection: Selection) -> FitData:
        users = sources.users
        train, valid = fit_records(sources.records, users, selection.chosen, selection.valid_idx)
        return FitData(users[selection.fit_idx], [p[selection.fit_idx] for p in sources.prompts.prompts], train,
                       valid)

    def _test(self, sources: Sources, split: str = "test") -> RecordSet:
        return RecordSet.from_frame(sources.records.split(split), sources.users)

    def evaluate_fitted(self, run: Run, sources: Sources, fits: Fits, fitted: Fitted, split: str = "test") -> dict:
        result = fitted.result
        prompts = mapped_prompts(result.mapping, fitted.prompts or sources.prompts.prompts)
        return evaluate(fits.plm, result.head, sources.task, prompts, self._test(sources, split),
                        run.cfg.fit.eval_batch_size, Cost(flops_per_token=result.cost.flops_per_token))

    def evaluate_source(self, run: Run, sources: Sources, i: int) -> dict:
        head = load_head(*(sources.head if i == 0 else sources.stores[i].read_head()))
        prompts = torch.from_numpy(sources.prompts.prompts[i])
        return evaluate(source_plm(sources, i, run.cfg.sources[i].model), head, sources.task,
                        lambda idx: prompts[idx], self._test(sources), run.cfg.fit.eval_batch_size)

    def reference(self, run: Run, sources: Sources) -> dict:
        ds = sources.records
        return reference_metrics(sources.task, ds.split("train"), ds.split("test"))

    def gate_sums(self, run: Run, sources: Sources, fits: Fits, target_store: str) -> pd.DataFrame:
        """Both systems over every validation record in this process. The new side is read back from the
        converted store (what ships, including the conversion itself); users it rejected are not gated."""
        target = PromptStore.open(target_store, run.cfg.storage)
        ids, converted = target.read_all()
        valid = sources.records.split("valid")
        valid = valid[valid["user_id"].isin(ids)]
        # the converted rows in the source's user order, so both systems read one record set
        aligned = np.zeros((len(sources.users), *converted.shape[1:]), np.float32)
        rows = pd.Index(ids).get_indexer(sources.users)
        aligned[rows >= 0] = converted[rows[rows >= 0]]
        old_prompts, new_prompts = torch.from_numpy(sources.prompts.prompts[0]), torch.from_numpy(aligned)
        old = System(source_plm(sources, 0, run.cfg.sources[0].model), load_head(*sources.head),
                     lambda idx: old_prompts[idx])
        new = System(fits.plm, load_head(*target.read_head()), lambda idx: new_prompts[idx])
        return system_loss_sums(sources.task, RecordSet.from_frame(valid, sources.users), old, new,
                                run.cfg.fit.eval_batch_size)
