"""The migration recipe, in one process: sources → select → fit → evaluate (PUMA + baselines) → convert → report.

Lifecycle of `run` (fixed; the Ray layer swaps the fit for a Train run and the conversion for an actor pool):
  1. data + source store(s) (trained first when missing and `prepare` is set: the demo builds its own source)
  2. per-user statistics and selection of `budget` training users (+ held-out validation users)
  3. fit the adapter through the frozen target; baselines: source, random init, linear, full retraining
  4. evaluate every method on the test records of all users
  5. save the adapter artifact, convert every user → the target store (manifest last), write report.json
Stages 1-3 are built from functions a sweep trial (puma_ray.recipes.sweep) reuses: load_sources, user_statistics,
split_users, new_head.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
import typing
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from puma_ray.artifacts.adapter_io import save_adapter
from puma_ray.artifacts.formats import sha256_hex
from puma_ray.artifacts.store import MANIFEST, PromptStore, StoreError, prompt_scale
from puma_ray.config import (
    ConfigError,
    DataConfig,
    EngineConfig,
    ModelConfig,
    PromptTrainConfig,
    StoreConfig,
    TemplateConfig,
    from_dict,
    task_template,
    to_dict,
)
from puma_ray.conversion.run import ConvertConfig, JoinedSources, convert, join_sources, run_locally
from puma_ray.data import Dataset, load_dataset
from puma_ray.fs import StorageOptions, filesystem, join
from puma_ray.models.adapter import AdapterConfig, PromptAdapter, num_parameters
from puma_ray.models.backbone import load_model
from puma_ray.models.heads import head_config, load_head, make_head
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.recipes.runs import provenance
from puma_ray.recipes.train_prompts import TrainPromptsJobConfig, item_texts, train_store
from puma_ray.selection.statistics import ffn_features, label_variance, source_loss
from puma_ray.selection.strategies import NEEDS, STRATEGIES, SelectionInput, check_selection, resolve_budget, select
from puma_ray.tasks import get_task
from puma_ray.training.cost import Cost
from puma_ray.training.evaluate import evaluate
from puma_ray.training.fit import FitConfig, FixedPrompts, fit_mapping, mapped_prompts
from puma_ray.training.records import RecordSet
from puma_ray.training.reference import reference_metrics


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
    seed: int = 0
    kmeans_sample: int = 100_000  # above this many users, mini-batch K-means on a sample (1M x 2048 stays cheap)
    pca_components: int = 32
    loss_records_per_user: int = 16  # the per-user loss only ranks users: a sample of records suffices
    global_bins: int = 8  # variance/loss bucketing: the original's 8 bins
    cluster_bins: int = 5  # within-cluster bins: the original's 5

    def __post_init__(self):
        from puma_ray.selection.strategies import STRATEGIES
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"selection.strategy {self.strategy!r} unknown; known: {sorted(STRATEGIES)}")
        if self.k < 1:
            raise ConfigError(f"selection.k must be >= 1, got {self.k}")


@dataclass
class BaselinesConfig:
    source: bool = True  # the source store on the source model: what users have today
    random_init: bool = True  # random target prompts, head trained on the same users: the floor
    linear: bool = True  # one linear map d_s → d_t: what the non-linear adapter buys
    full_retrain: bool = False  # every prompt retrained on the target: the (expensive) upper bound
    full_retrain_train: PromptTrainConfig = field(default_factory=PromptTrainConfig)
    # "engine": baseline fits run where PUMA's does; "local": in the driver process (a small demo skips three
    # Ray Train start-ups; on a GPU cluster keep "engine", the driver has no GPU)
    fits_on: Literal["engine", "local"] = "engine"


@dataclass
class MigrateJobConfig:
    sources: list[SourceConfig] = field(default_factory=list)  # one per source model; several = aggregated migration
    target: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    template: TemplateConfig | None = None  # None: the first source store's template
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    storage: StorageOptions = field(default_factory=StorageOptions)
    target_store: str = "{output}/target-store"
    adapter_path: str = "{output}/adapter"
    # a user absent from one source: "error", or "reject" (counted, listed)
    sources_missing_policy: Literal["error", "reject"] = "error"
    convert: ConvertConfig = field(default_factory=ConvertConfig)  # the last stage: every user → the target store
    engine: EngineConfig = field(default_factory=EngineConfig)
    threads: int | None = None

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


def _foundation_cards(cfg: MigrateJobConfig) -> dict:
    """{model folder: its foundation card} for the models of this run that were pretrained here (family, width,
    seed, the train records they read, recipe, wall)."""
    from puma_ray.recipes.foundation import read_card
    folders = [m.name for m in [*(s.model for s in cfg.sources), cfg.target] if os.path.isdir(m.name)]
    return {f: card for f in folders if (card := read_card(f))}


def store_exists(path: str, storage) -> bool:
    """Whether a complete store (its manifest) is at `path`."""
    fs, root = filesystem(path, storage)
    return fs.exists(join(root, MANIFEST))


def _prepare_source(cfg: MigrateJobConfig, src: SourceConfig, path: str, ds: Dataset, log) -> dict | None:
    if store_exists(path, cfg.storage):
        return None
    if src.prepare is None:
        raise StoreError(f"source store {path} does not exist (no {MANIFEST}) and sources[].prepare is not set")
    log(f"source store {path} missing: training it on {src.model.name} first")
    job = TrainPromptsJobConfig(model=src.model, data=cfg.data, template=cfg.template, train=src.prepare,
                                store=cfg.store, storage=cfg.storage)
    report, _ = train_store(job, ds, path, log=lambda m: log("  " + m))
    return report


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


def _statistics(cfg: SelectionConfig, joined: JoinedSources, ds: Dataset, source_plm, source_head, task,
                variance_fn=label_variance):
    """The per-user features the chosen strategy needs (and only those), with what computing them cost."""
    inputs, costs = user_statistics(cfg, NEEDS[cfg.strategy], joined, ds, source_plm, source_head, task, variance_fn)
    return inputs, statistics_cost(costs, cfg.strategy)


@dataclass
class Sources:
    """Step 1's outcome: the data (less users without a prompt), the source store(s) joined on user_id, and what a
    fit through the target needs from them (template, l, item texts, the source head)."""
    ds: Dataset
    task: str
    metric: str
    reports: dict  # source store path -> report of its training, for stores trained here (`prepare`)
    stores: list
    backbones: list
    joined: JoinedSources
    template: TemplateConfig
    l: int
    texts: dict
    source_plm: PromptedLM
    head_state: dict
    head_cfg: dict


def load_sources(cfg: MigrateJobConfig, output: str, log=print) -> Sources:
    """Data + source store(s), each trained first when missing and `prepare` is set."""
    ds = load_dataset(cfg.data, cfg.storage)
    task, metric = ds.task, get_task(ds.task).primary
    log(f"data {ds.summary()}")
    sel = cfg.selection  # before any training: an impossible selection is one line now, not after the stores
    check_selection(sel.budget, sel.valid_users, int(ds.records["user_id"].nunique()))
    source_reports, stores, source_backbones = {}, [], []
    for i, src in enumerate(cfg.sources):
        path = src.store.format(output=output)
        prepared = _prepare_source(cfg, src, path, ds, log)
        if prepared:
            source_reports[path] = prepared
        store = PromptStore.open(path, cfg.storage)
        backbone = load_model(src.model)
        store.check_model(backbone.identity)
        stores.append(store)
        source_backbones.append(backbone)
    joined = join_sources(stores, cfg.sources_missing_policy, cfg.convert.max_prompt_scale)
    for path, users in joined.out_of_scale.items():  # left out of everything but the conversion's rejects
        log(f"source {path}: {len(users)} user(s) with an out-of-scale prompt (e.g. {users[0]!r}) left out of "
            "selection, fit and evaluation; the conversion rejects them with the reason")
        ds = Dataset(ds.records[~ds.records["user_id"].isin(users)], ds.items, ds.task, ds.name, ds.provenance)
    record_users = np.unique(ds.records["user_id"].to_numpy(dtype=str))  # str, not object: O(n log n) set ops
    without_prompt = np.setdiff1d(record_users, joined.users)
    if len(without_prompt):
        if cfg.sources_missing_policy == "error":
            raise StoreError(f"user {without_prompt[0]!r} has records but no prompt in the source store(s) "
                             f"({len(without_prompt)} user(s) in all)")
        ds = Dataset(ds.records[ds.records["user_id"].isin(joined.users)], ds.items, ds.task, ds.name, ds.provenance)
    template = task_template(cfg.template, task) if cfg.template else from_dict(
        TemplateConfig, stores[0].manifest.template, f"store {stores[0].path} template")
    l = stores[0].manifest.prompt_length
    texts = item_texts(ds)
    head_state, head_cfg = stores[0].read_head()
    return Sources(ds, task, metric, source_reports, stores, source_backbones, joined, template, l, texts,
                   PromptedLM(source_backbones[0], template, l, texts, cfg.sources[0].model.prefix_cache_mib),
                   head_state, head_cfg)


def new_head(head_state: dict, head_cfg: dict, task: str):
    """A fit's starting head: the source's when the tasks agree (as the paper), else a fresh one."""
    if head_cfg["task"] == task:
        return load_head(copy.deepcopy(head_state), head_cfg)
    return make_head(task)


@dataclass
class FitSplit:
    """The users a fit sees: `chosen` (training records) + held-out validation users (early stopping)."""
    chosen: np.ndarray  # indices into the joined users
    valid_idx: np.ndarray
    fit_idx: np.ndarray  # chosen ∪ valid_idx: the rows of the fit's prompt inputs
    fit_users: np.ndarray
    train: object  # pd.DataFrame: train records of the chosen users
    valid: object  # pd.DataFrame: valid records of the validation users


def choose_valid(sel: SelectionConfig, n_users: int, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(valid_idx, fit_idx): `sel.valid_users` validation users drawn (seeded) from those not chosen (all chosen if
    none is left), and chosen ∪ valid."""
    rest = np.setdiff1d(np.arange(n_users), chosen)
    n_valid = min(len(rest), resolve_budget(sel.valid_users, n_users, "selection.valid_users")) if len(rest) else 0
    valid_idx = np.sort(np.random.default_rng(sel.seed + 1).choice(rest, n_valid, replace=False)) if n_valid else chosen
    return valid_idx, np.union1d(chosen, valid_idx)


def split_users(sel: SelectionConfig, users: np.ndarray, ds: Dataset, chosen: np.ndarray) -> FitSplit:
    valid_idx, fit_idx = choose_valid(sel, len(users), chosen)
    train_recs = ds.split("train")[ds.split("train")["user_id"].isin(users[chosen])]
    valid_recs = ds.split("valid")[ds.split("valid")["user_id"].isin(users[valid_idx])]
    return FitSplit(chosen, valid_idx, fit_idx, users[fit_idx], train_recs, valid_recs)


def prompt_rms(prompts: np.ndarray) -> float:
    return prompt_scale(prompts)


def run(cfg: MigrateJobConfig, output: str, log=print, fit_fn=fit_mapping, variance_fn=label_variance,
        convert_runner=run_locally) -> dict:
    """fit_fn: fit.fit_mapping (this process) or the Ray layer's Train + DeepSpeed fit (same signature);
    variance_fn: user_stats.label_variance or the Ray layer's streaming aggregation;
    convert_runner: convert.run_locally or the Ray layer's actor pool."""
    t_start = time.perf_counter()
    cfg = resolve_foundations(cfg, log)
    # 1. data + sources
    src = load_sources(cfg, output, log)
    ds, task, metric, source_reports, joined = src.ds, src.task, src.metric, src.reports, src.joined
    stores, source_backbones, template, l, texts = src.stores, src.backbones, src.template, src.l, src.texts
    source_plm, head_state, head_cfg = src.source_plm, src.head_state, src.head_cfg
    source_head = load_head(head_state, head_cfg)

    # 2. selection
    sel = cfg.selection
    n_users = len(joined.users)
    budget = resolve_budget(sel.budget, n_users)
    inputs, stats_cost = _statistics(sel, joined, ds, source_plm, source_head, task, variance_fn)
    t0 = time.perf_counter()
    chosen = select(sel.strategy, inputs, budget, sel.k, sel.seed)
    stats_cost.wall_s += time.perf_counter() - t0
    split = split_users(sel, joined.users, ds, chosen)
    valid_idx, fit_idx, fit_users = split.valid_idx, split.fit_idx, split.fit_users
    train_recs, valid_recs = split.train, split.valid
    log(f"selection {sel.strategy}: {budget} of {n_users} users (K={sel.k}), {len(valid_idx)} validation users, "
        f"{stats_cost.wall_s:.1f}s")
    fit_inputs = [p[fit_idx] for p in joined.prompts]

    # 3. target + fits
    target = load_model(cfg.target)
    plm = PromptedLM(target, template, l, texts, cfg.target.prefix_cache_mib)
    test = RecordSet.from_frame(ds.split("test"), joined.users)
    # the LLM-free predictors on the same test records: does any LLM row personalize at all?
    reference = reference_metrics(task, ds.split("train"), ds.split("test"))
    source_dims = [b.hidden_size for b in source_backbones]
    scales = [prompt_rms(p) for p in joined.prompts]

    def fresh_head():
        return new_head(head_state, head_cfg, task)  # the paper: target head starts from the source's

    methods, costs, fits = {}, {}, {}

    def fit_and_test(name: str, mapping, inputs_for_fit, inputs_all):
        log(f"fit {name} ({num_parameters(mapping):,} parameters) on {len(train_recs)} records")
        fit = fit_fn if name == "puma" or cfg.baselines.fits_on == "engine" else fit_mapping
        result = fit(plm, task, mapping, inputs_for_fit, fit_users, train_recs, valid_recs, fresh_head(),
                        cfg.fit, log=log, name=name)
        eval_cost = Cost(flops_per_token=result.cost.flops_per_token)
        methods[name] = evaluate(plm, result.head, task, mapped_prompts(result.mapping, inputs_all), test,
                                 cfg.fit.eval_batch_size, eval_cost)
        fits[name] = result
        return result

    puma = fit_and_test("puma", PromptAdapter(source_dims, target.hidden_size, cfg.adapter, scales, plm.embed_rms,
                                                    seed=cfg.fit.seed),
                        fit_inputs, joined.prompts)
    costs["puma"] = stats_cost.merge(puma.cost).to_dict()
    if cfg.baselines.linear:
        lin = fit_and_test("linear", PromptAdapter(source_dims, target.hidden_size, AdapterConfig(kind="linear"),
                                                   scales, plm.embed_rms, seed=cfg.fit.seed), fit_inputs,
                           joined.prompts)
        costs["linear"] = stats_cost.merge(lin.cost).to_dict()
    if cfg.baselines.random_init:
        rng = np.random.default_rng(sel.seed)
        random_prompts = (rng.uniform(-3 ** 0.5, 3 ** 0.5, (n_users, l, target.hidden_size)) * plm.embed_rms)
        random_prompts = random_prompts.astype(np.float32)
        ri = fit_and_test("random_init", FixedPrompts(), [random_prompts[fit_idx]], [random_prompts])
        costs["random_init"] = ri.cost.to_dict()
    if cfg.baselines.source:
        for i, (store, backbone) in enumerate(zip(stores, source_backbones)):
            name = "source" if i == 0 else f"source_{i}"
            splm = source_plm if i == 0 else PromptedLM(backbone, template, l, texts,
                                                        cfg.sources[i].model.prefix_cache_mib)
            shead = source_head if i == 0 else load_head(*store.read_head())
            prompts = torch.from_numpy(joined.prompts[i])
            methods[name] = evaluate(splm, shead, task, lambda idx, p=prompts: p[idx], test, cfg.fit.eval_batch_size)
    if cfg.baselines.full_retrain:
        log("full retraining on the target (every user's prompt from scratch)")
        job = TrainPromptsJobConfig(model=cfg.target, data=cfg.data, template=template,
                                    train=cfg.baselines.full_retrain_train, store=cfg.store, storage=cfg.storage)
        full_report, _ = train_store(job, ds, join(output, "full-retrain-store"), log=lambda m: log("  " + m))
        methods["full_retrain"] = full_report["methods"]["store"]
        costs["full_retrain"] = full_report["cost"]["train_prompts"]

    # 5. artifacts
    adapter_path = cfg.adapter_path.format(output=output)
    meta = {
        "sources": [vars(b.identity) for b in source_backbones], "target": vars(target.identity),
        "prompt_length": l, "task": task, "template": to_dict(template),
        "selection": {**to_dict(sel), "budget": budget, "users_selected": int(budget), "users_total": n_users},
        "fit": to_dict(cfg.fit), "history": puma.history, "best_epoch": puma.best_epoch, "metrics": methods["puma"],
        "data": ds.summary(), "provenance": provenance(to_dict(cfg)),
    }
    save_adapter(adapter_path, puma.mapping, puma.head, head_config(task, puma.head), meta, cfg.storage)
    target_path = cfg.target_store.format(output=output)
    conversion = convert_everyone(cfg, adapter_path, [s.path for s in stores], target_path, methods["puma"],
                                  convert_runner, log)
    costs["puma"]["convert_wall_s"] = conversion["wall_s"]
    if plm.prefix_cache is not None:  # this process's: the target's (Ray Train workers hold their own)
        log(f"target {plm.prefix_cache.stats.describe()}")
    return migration_report(
        cfg, task=task, sources=meta["sources"], target=meta["target"], budget=budget, users=joined.users,
        chosen=chosen, valid_idx=valid_idx, methods=methods, reference=reference, costs=costs, metric=metric,
        target_path=target_path, adapter_path=adapter_path, conversion=conversion, source_reports=source_reports,
        fits=fits, data=ds.summary(), wall_s=time.perf_counter() - t_start)


def convert_everyone(cfg: MigrateJobConfig, adapter_path: str, source_paths: list[str], target_path: str,
                     puma_test: dict, convert_runner, log) -> dict:
    """Stage 5: every user of the source store(s) through the saved adapter into the target store (manifest
    last); the conversion's provenance carries PUMA's test metrics."""
    convert_cfg = dataclasses.replace(cfg.convert, missing_policy=cfg.sources_missing_policy,
                                      overwrite=cfg.convert.overwrite or cfg.store.overwrite)
    conversion = convert(adapter_path, source_paths, target_path, convert_cfg, cfg.storage,
                         run_locally if cfg.convert.runs_on == "local" else convert_runner,
                         provenance={**provenance(to_dict(cfg)), "test": puma_test}, log=log)
    log(f"converted {conversion['users']} users → {target_path} ({conversion['rows_per_s']} rows/s)")
    return conversion


def migration_report(cfg: MigrateJobConfig, *, task, sources, target, budget, users, chosen, valid_idx, methods,
                     reference, costs, metric, target_path, adapter_path, conversion, source_reports, fits, data,
                     wall_s, **extra) -> dict:
    """report.json of a migration (in-process or lean driver): one shape for the markdown report and the tests."""
    sel = cfg.selection
    report = {
        "task": task, "source": sources[0], "sources": sources, "target": target,
        "selection": {"strategy": sel.strategy, "k": sel.k, "budget": budget, "users_selected": int(len(chosen)),
                      "users_total": len(users), "validation_users": int(len(valid_idx)),
                      # which users the adapter was fitted on, without listing them (compare two runs)
                      "selected_sha256": sha256_hex("\n".join(map(str, users[chosen])).encode())},
        "methods": methods, "reference": reference, "cost": costs, "primary_metric": metric,
        "store": target_path, "adapter": adapter_path, "conversion": conversion,
        "source_training": {p: {"methods": r["methods"], "cost": r["cost"]} for p, r in source_reports.items()},
        "fits": {k: v.summary() for k, v in fits.items()},
        "data": data, "wall_s": round(wall_s, 2),
        "provenance": provenance(to_dict(cfg)), "foundations": _foundation_cards(cfg), **extra,
    }
    if "full_retrain" in costs:
        report["cost_ratio_full_retrain_over_puma"] = {
            k: costs["full_retrain"][k] / costs["puma"][k] for k in ("wall_s", "llm_record_passes", "flops")
            if costs["puma"][k]}
    return report


def format_report(report: dict) -> str:
    keys = get_task(report["task"]).metrics
    lines = [f"{'method':<14}" + "".join(f"{k:>9}" for k in keys) + f"{'wall_s':>10}{'LLM passes':>12}{'FLOPs':>11}"]
    for name, m in report["methods"].items():
        c = report["cost"].get(name, {})
        lines.append(f"{name:<14}" + "".join(f"{m.get(k, float('nan')):>9.4f}" for k in keys)
                     + f"{c.get('wall_s', 0):>10.1f}{c.get('llm_record_passes', 0):>12,}{c.get('flops', 0):>11.2e}")
    for name, m in report.get("reference", {}).items():  # no LLM, fitted on the train split: nothing to pay
        lines.append(f"{name + ' *':<14}" + "".join(f"{m.get(k, float('nan')):>9.4f}" for k in keys))
    if report.get("reference"):
        lines.append("* reference rows: no LLM, fitted on the train split, same test records")
    ratio = report.get("cost_ratio_full_retrain_over_puma")
    if ratio:
        lines.append("cost full retraining / PUMA: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratio.items()))
    return "\n".join(lines)
