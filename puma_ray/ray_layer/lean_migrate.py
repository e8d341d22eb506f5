"""The migration with a lean driver (`engine.driver: lean`): the driver holds per-user statistic rows and the fit
users' prompts and records, never the records table or the prompt matrix. recipes/migrate.py's stages, in order:

  1. sources   one Ray Data groupby over the records gives each user's record counts and train-label variance
               (rows, not records); a missing source store is trained by Eq. 1 on Ray Train when `prepare` is set
               (ray_layer/prompt_train.py); stores opened and indexed (their user_id columns: `StoreIndex`)
  2. selection K-means on a sample of the prompts in the driver; every store shard assigned, and the prompt scale
               summed, by an actor pool (the labels the in-process path computes: strategies.kmeans_labels); the
               source loss per user by the evaluation actors (the in-process sample and sums)
  3. fits      the fit users' prompts (`StoreIndex.rows`) and records (a Parquet filter on user_id, run in a Ray
               task) → Ray Train;
               full retraining: Eq. 1 on Ray Train, each worker owning its users' prompts
  4. evaluate  every method on the test split by an actor pool (ray_layer/evaluate.py: a store, or an adapter
               mapping the source stores in the actor); the LLM-free reference rows in one Ray task
  5. convert   adapter saved, every user converted by the actor pool, report.json
What needs the whole prompt matrix or every record in one process is refused up front with one line
(`check_lean`): the PCA and farthest-point strategies (every prompt at once) and the random-init baseline.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pandas as pd
import ray

from puma_ray.artifacts.adapter_io import save_adapter
from puma_ray.artifacts.store import PromptStore, StoreError, typical_rms
from puma_ray.artifacts.store_index import StoreIndex, sorted_member, sorted_positions
from puma_ray.config import ConfigError, TemplateConfig, from_dict, task_template, to_dict
from puma_ray.conversion.run import run_locally
from puma_ray.data.parquet_reads import read_splits, read_user_records
from puma_ray.fs import StorageOptions, is_remote
from puma_ray.models.adapter import AdapterConfig, PromptAdapter, num_parameters
from puma_ray.models.backbone import load_model
from puma_ray.models.heads import head_config
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.recipes.migrate import (
    MigrateJobConfig,
    choose_valid,
    convert_everyone,
    migration_report,
    new_head,
    store_exists,
)
from puma_ray.recipes.runs import provenance
from puma_ray.selection.statistics import ffn_features
from puma_ray.selection.strategies import (
    NEEDS,
    SelectionInput,
    check_selection,
    kmeans_labels,
    kmeans_sample_rows,
    resolve_budget,
    sampled_kmeans,
    select,
)
from puma_ray.tasks import get_task
from puma_ray.training.cost import Cost
from puma_ray.training.fit import fit_mapping
from puma_ray.training.memory import return_freed_memory

from .compat import actor_pool, actor_retries
from .data import read_records
from .evaluate import PromptSource, RecordFiles, evaluate_on_ray, source_loss_on_ray

# strategies whose features the lean driver computes: cluster labels of the prompts and of the FFN features, the
# label variance and the source loss (actors)
LEAN_STRATEGIES = ("random", "variance_bucketing", "loss_bucketing", "kmeans_stratified", "kmeans_variance",
                   "kmeans_loss", "ffn_kmeans", "ffn_kmeans_loss", "ffn_kmeans_variance")
CLUSTERED = ("kmeans_stratified", "kmeans_variance", "kmeans_loss")
SPLITS = ("train", "valid", "test")


def check_lean(cfg: MigrateJobConfig) -> None:
    """One line for every setting the lean driver cannot honour, before anything runs."""
    where = "engine.driver lean"
    if cfg.data.name != "parquet":
        raise ConfigError(f"{where} reads the records where they lie: data.name must be parquet (save_dataset "
                          f"writes it), got {cfg.data.name!r}")
    if cfg.data.max_users:
        raise ConfigError(f"{where}: data.max_users cuts the records table in the driver; write the cut as parquet")
    if cfg.selection.strategy not in LEAN_STRATEGIES:
        raise ConfigError(f"{where}: selection.strategy {cfg.selection.strategy!r} needs every prompt or a per-user "
                          f"model pass in the driver; lean strategies: {list(LEAN_STRATEGIES)}")
    if cfg.baselines.random_init:
        raise ConfigError(f"{where}: baselines.random_init is not run on the lean driver yet; set it false "
                          "(source, linear and full_retrain are)")


# ---------------------------------------------------------------------------------------------- 1. sources
def joined_users(indexes: list[StoreIndex], policy: str) -> tuple[np.ndarray, dict]:
    """Sorted users present in every source (policy "error": every source must hold every user)."""
    if len(indexes) == 1:  # one source: its sorted ids as they are (no concatenated copy to sort at 1M users)
        if len(indexes[0].users) == 0:
            raise StoreError("the source stores share no user")
        return indexes[0].users, {}
    all_users = np.unique(np.concatenate([ix.users for ix in indexes]))
    common, dropped = all_users, {}
    for ix in indexes:
        missing = ~ix.has(all_users)
        if missing.any():
            if policy == "error":
                raise StoreError(f"user {str(all_users[missing][0])!r} is missing from source store {ix.store.path} "
                                 f"({int(missing.sum())} user(s) in all)")
            dropped[ix.store.path] = int(missing.sum())
            common = common[ix.has(common)]
    if len(common) == 0:
        raise StoreError("the source stores share no user")
    return common, dropped


def _train_label_columns(block: pd.DataFrame) -> pd.DataFrame:
    train = block["split"] == "train"
    return pd.DataFrame({"user_id": block["user_id"].astype(str), "train_label": block["label"].astype(np.float64)
                         .where(train), **{split: (block["split"] == split).astype(np.int64) for split in SPLITS}})


@dataclasses.dataclass
class UserRows:
    """One row per user with records, as arrays (no Python object per user): sorted ids, records of each split,
    train-label variance (ddof=1; 0 for a single record)."""
    users: np.ndarray
    counts: dict[str, np.ndarray]
    variance: np.ndarray

    def variance_of(self, users: np.ndarray) -> np.ndarray:
        pos = sorted_positions(self.users, users)
        return np.where(pos >= 0, self.variance[pos], 0.0)


def per_user_rows(records_path: str, storage: StorageOptions | None) -> UserRows:
    """One Ray Data groupby over the records; the driver receives its rows batch by batch."""
    from ray.data.aggregate import Mean, Std, Sum
    grouped = (read_records(records_path, storage)
               .map_batches(_train_label_columns, batch_format="pandas", batch_size=None)
               .groupby("user_id")
               .aggregate(*(Sum(split, alias_name=split) for split in SPLITS),
                          Mean("train_label", alias_name="mean", ignore_nulls=True),
                          Std("train_label", ddof=1, alias_name="std", ignore_nulls=True)))
    parts = {key: [] for key in ("user_id", "std", *SPLITS)}
    for batch in grouped.iter_batches(batch_size=65_536, batch_format="pyarrow"):
        parts["user_id"].append(batch.column("user_id").to_numpy(zero_copy_only=False).astype(str))
        parts["std"].append(batch.column("std").to_numpy(zero_copy_only=False).astype(np.float64))
        for key in SPLITS:
            parts[key].append(batch.column(key).to_numpy(zero_copy_only=False).astype(np.int64))
    ids = np.concatenate(parts.pop("user_id")) if parts["std"] else np.array([], dtype=str)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    columns = {key: (np.concatenate(v) if v else np.zeros(0))[order] for key, v in parts.items()}
    del parts, order
    return_freed_memory()  # the batches' temporary Python strings: glibc would keep their heap
    std = np.nan_to_num(columns.pop("std"), nan=0.0)  # null: one train record (or none)
    return UserRows(ids, columns, np.square(std))


# ---------------------------------------------------------------------------------------------- 2. selection
class _ShardPass:
    """Per shard of the first source store: its users, their K-means labels (-1 without a model), the K-means
    labels of their FFN features (when `ffn` holds the source model and a fitted K-means) and each source's sum of
    squares over the user's prompt (the prompt scale the adapter is built with), one row per user."""

    def __init__(self, paths: list[str], model, storage: StorageOptions | None, ffn: dict | None = None):
        self.stores = [PromptStore.open(p, storage) for p in paths]
        self.others = [StoreIndex(s) for s in self.stores[1:]]
        self.model, self.ffn = model, ffn
        if ffn is not None:  # the source model, as the driver's statistics.ffn_features runs it
            self.plm = _source_plm(ffn["model"], self.stores[0])

    def __call__(self, batch: dict) -> dict:
        ids, first = self.stores[0].read_shard(self.stores[0].manifest.shards[int(batch["shard"][0])])
        # a user some other source lacks is dropped by the missing-user policy in the driver: zeros here
        prompts = [first, *(self._aligned(ix, ids) for ix in self.others)]
        flat = np.concatenate([p.reshape(len(p), -1) for p in prompts], axis=1)
        labels = self.model.predict(flat) if self.model is not None else np.full(len(ids), -1)
        ffn_labels = np.full(len(ids), -1)
        if self.ffn is not None:
            ffn_labels = self.ffn["kmeans"].predict(ffn_features(self.plm, first)[0])
        return {"user_id": ids.astype(str), "label": np.asarray(labels, np.int32),
                "ffn_label": np.asarray(ffn_labels, np.int32),
                "sumsq": np.stack([np.square(p, dtype=np.float64).reshape(len(p), -1).sum(1) for p in prompts], 1)}

    @staticmethod
    def _aligned(index: StoreIndex, ids: np.ndarray) -> np.ndarray:
        out = np.zeros((len(ids), *index.store.prompt_shape), np.float32)
        have = index.has(ids)
        out[have] = index.rows(ids[have])
        return out


def _source_plm(model, store: PromptStore):
    from puma_ray.models.prompted_lm import PromptedLM
    backbone = load_model(model)
    store.check_model(backbone.identity)
    return PromptedLM(backbone, TemplateConfig(**store.manifest.template), store.manifest.prompt_length, {}, 0)


def shard_pass(stores: list[PromptStore], users: np.ndarray, model, storage, actors: int, cpus_per_actor: float,
               ffn: dict | None = None):
    """(prompt K-means labels aligned with the sorted `users` (-1 without a model), FFN K-means labels (-1 without
    `ffn`), prompt RMS per source over them); every user is seen exactly once. The driver receives rows of (id,
    labels, sums), batch by batch."""
    items = ray.data.from_items([{"shard": k} for k in range(len(stores[0].manifest.shards))])
    parts = items.map_batches(_ShardPass, batch_size=1, batch_format="numpy",
                              fn_constructor_kwargs={"paths": [s.path for s in stores], "model": model,
                                                     "storage": storage, "ffn": ffn},
                              num_cpus=cpus_per_actor, **actor_pool(min(actors, len(stores[0].manifest.shards))),
                              **actor_retries())
    labels, ffn_labels = np.full(len(users), -2, np.int32), np.full(len(users), -2, np.int32)
    seen = np.zeros(len(users), np.int64)
    sumsq = np.zeros((len(users), len(stores)))
    for batch in parts.iter_batches(batch_size=65_536, batch_format="numpy"):
        pos = sorted_positions(users, batch["user_id"].astype(str))
        kept = pos >= 0  # not kept: dropped by the missing-user policy
        labels[pos[kept]] = batch["label"][kept]
        ffn_labels[pos[kept]] = batch["ffn_label"][kept]
        np.add.at(seen, pos[kept], 1)
        sumsq[pos[kept]] = np.asarray(batch["sumsq"], np.float64)[kept]
    if (seen != 1).any():  # a user in no shard or in two: the store changed since it was indexed
        bad = int(np.flatnonzero(seen != 1)[0])
        raise StoreError(f"store {stores[0].path}: user {str(users[bad])!r} read {int(seen[bad])} times in its shards")
    values = [s.manifest.prompt_length * s.manifest.hidden_size for s in stores]
    return labels, ffn_labels, [typical_rms(np.sqrt(sumsq[:, i] / v)) or 1.0 for i, v in enumerate(values)]


def lean_ffn_clusters(source_plm, index: StoreIndex, users: np.ndarray, k: int, seed: int, sample: int):
    """The FFN-feature clusters by kmeans_labels' two steps, as lean_clusters does for the prompts: features of at
    most `sample` users computed and clustered in the driver, the rest featurised and assigned on the actors."""
    rows = kmeans_sample_rows(len(users), seed, sample)
    picked = users if rows is None else users[rows]
    features = ffn_features(source_plm, index.rows(picked))[0]
    if rows is None:
        return kmeans_labels(features, k, seed, sample), None
    return None, sampled_kmeans(features, k, seed)


def lean_clusters(indexes: list[StoreIndex], users: np.ndarray, k: int, seed: int, sample: int):
    """kmeans_labels' two steps: the fit in the driver on at most `sample` users' prompts, the assignment of the
    rest on the cluster (None: the shard pass assigns nothing, the driver already has every label)."""
    rows = kmeans_sample_rows(len(users), seed, sample)
    picked = users if rows is None else users[rows]
    x = np.concatenate([ix.rows(picked).reshape(len(picked), -1) for ix in indexes], axis=1)
    if rows is None:  # a small population: plain K-means on all of it, as in-process
        return kmeans_labels(x, k, seed, sample), None
    return None, sampled_kmeans(x, k, seed)


# ---------------------------------------------------------------------------------------------- 3. fit records
_user_records = ray.remote(read_user_records)


@ray.remote
def _reference_rows(records_path: str, storage: StorageOptions | None, task: str) -> dict:
    from puma_ray.training.reference import reference_metrics
    frame = read_splits(records_path, ["train", "test"], storage)
    return reference_metrics(task, frame[frame["split"] == "train"], frame[frame["split"] == "test"])


# ---------------------------------------------------------------------------------------------- Eq. 1 stores
@dataclasses.dataclass
class _Eq1OnRay:
    """A store trained by Eq. 1 on Ray Train (a missing source store, full retraining), then evaluated on the test
    split by the actor pool: the report shape recipes.train_prompts.train_store gives in process."""
    cfg: MigrateJobConfig
    output: str
    records_path: str
    texts: dict
    task: str
    test: RecordFiles
    evaluation: dict
    log: object

    def train(self, name: str, model, backbone, train_cfg, path: str, users: np.ndarray, template) -> dict:
        from puma_ray.fs import join
        from puma_ray.ray_layer.prompt_train import train_store_on_ray
        cfg = self.cfg
        out = train_store_on_ray(
            path, model, backbone.identity.fingerprint, backbone.identity, template, self.texts, self.task, users,
            self.records_path, train_cfg, cfg.engine, cfg.engine.storage_path or join(self.output, "train"),
            f"{cfg.engine.run_name or os.path.basename(self.output.rstrip('/'))}-{name}",
            shard_rows=cfg.store.shard_rows, storage=cfg.storage, overwrite=cfg.store.overwrite,
            lineage={"kind": "trained", "data": self.records_path, "trainer": "puma_ray.ray_layer.prompt_train"},
            provenance=provenance(to_dict(cfg)), log=lambda m: self.log("  " + m))
        test = evaluate_on_ray(PromptSource("store", path), model, self.test, self.texts, self.task,
                               template=template, **self.evaluation)
        self.log(f"  {name} store: test {get_task(self.task).primary} {test[get_task(self.task).primary]:.4f}")
        return {"methods": {"store": test}, "cost": {"train_prompts": out["cost"].to_dict()},
                "training": {"history": out["history"], "best_epoch": out["best_epoch"], "valid": out["valid"]}}


# ---------------------------------------------------------------------------------------------- the run
def run_lean(cfg: MigrateJobConfig, output: str, log=print, fit_fn=None, convert_runner=run_locally,
             **_local_only) -> dict:
    """recipes.migrate.run's migration with the driver holding only per-user rows and the fit users' data."""
    check_lean(cfg)
    t_start = time.perf_counter()
    records_path = cfg.data.paths["records"]
    # 1. data rows, then the sources (a missing one trained first, on Ray Train, when `prepare` is set)
    stats = per_user_rows(records_path, cfg.storage)
    items_path = cfg.data.paths["items"]
    items = pd.read_parquet(items_path, columns=["item_id", "text"],
                            storage_options=(cfg.storage.fsspec_kwargs() or None) if is_remote(items_path) else None)
    texts = dict(zip(items["item_id"].astype(str), items["text"]))
    task = cfg.data.options.get("task", "rating")
    metric = get_task(task).primary
    template = task_template(cfg.template, task) if cfg.template else None  # None: the first store's
    test = RecordFiles((records_path,), "test")
    evaluation = {"actors": cfg.engine.actors, "cpus_per_actor": cfg.engine.cpus_per_actor,
                  "gpus_per_actor": cfg.engine.gpus_per_actor, "batch_size": cfg.fit.eval_batch_size,
                  "storage": cfg.storage}
    eq1 = _Eq1OnRay(cfg, output, records_path, texts, task, test, evaluation, log)
    stores, source_backbones, source_reports = [], [], {}
    for i, src in enumerate(cfg.sources):
        path = src.store.format(output=output)
        backbone = load_model(src.model)
        if not store_exists(path, cfg.storage):
            if src.prepare is None:
                raise StoreError(f"source store {path} does not exist (no manifest) and sources[].prepare is not set")
            log(f"source store {path} missing: training it on {src.model.name} first (Ray Train, "
                f"{cfg.engine.num_workers} worker(s))")
            source_reports[path] = eq1.train(f"source-{i}", src.model, backbone, src.prepare, path, stats.users,
                                             task_template(cfg.template, task))
        store = PromptStore.open(path, cfg.storage)
        store.check_model(backbone.identity)
        stores.append(store)
        source_backbones.append(backbone)
    if len({s.manifest.prompt_length for s in stores}) > 1:
        raise StoreError("aggregated sources must share the prompt length l")
    indexes = [StoreIndex(s) for s in stores]
    users, dropped = joined_users(indexes, cfg.sources_missing_policy)
    without = stats.users[~sorted_member(users, stats.users)]  # both sorted: no concatenated copy to sort
    if len(without):  # the lean path evaluates every record's user: a user without a prompt is an error
        raise StoreError(f"user {str(without[0])!r} has records but no prompt in the source store(s) "
                         f"({len(without)} user(s) in all)")
    n_users = len(users)
    counts = {split: int(stats.counts[split].sum()) for split in SPLITS}
    log(f"data {records_path}: {n_users:,} users with a prompt, records {counts} "
        f"(read by Ray Data; the driver holds {len(stats.users):,} per-user rows)")
    sel = cfg.selection
    check_selection(sel.budget, sel.valid_users, n_users)
    template = template or from_dict(TemplateConfig, stores[0].manifest.template,
                                     f"store {stores[0].path} template")
    l = stores[0].manifest.prompt_length

    # 2. selection
    t0 = time.perf_counter()
    budget = resolve_budget(sel.budget, n_users)
    variance = stats.variance_of(users)
    del stats
    inputs = SelectionInput(users, None, variance=variance, options={k: getattr(sel, k) for k in (
        "kmeans_sample", "pca_components", "global_bins", "cluster_bins")})
    labels, model = (lean_clusters(indexes, users, sel.k, sel.seed, sel.kmeans_sample)
                     if sel.strategy in CLUSTERED else (None, None))
    ffn_labels, ffn_model = (lean_ffn_clusters(_source_plm(cfg.sources[0].model, stores[0]), indexes[0], users,
                                               sel.k, sel.seed, sel.kmeans_sample)
                             if "ffn" in NEEDS[sel.strategy] else (None, None))
    assigned, ffn_assigned, scales = shard_pass(
        stores, users, model, cfg.storage, cfg.engine.actors, cfg.engine.cpus_per_actor,
        ffn={"model": cfg.sources[0].model, "kmeans": ffn_model} if ffn_model is not None else None)
    inputs.clusters = labels if labels is not None else (assigned if model is not None else None)
    inputs.ffn_clusters = ffn_labels if ffn_labels is not None else (ffn_assigned if ffn_model is not None
                                                                     else None)
    return_freed_memory()  # the shard pass's batches of ids
    stats_cost = Cost()
    if "loss" in NEEDS[sel.strategy]:  # the source model's loss per user, on the actors
        inputs.loss, stats_cost.forward_records, stats_cost.tokens_forward = source_loss_on_ray(
            stores[0].path, cfg.sources[0].model, RecordFiles((records_path,), "train"), texts, task, users,
            template=template, max_records=sel.loss_records_per_user, seed=sel.seed, **evaluation)
        stats_cost.flops_per_token = 2.0 * (source_backbones[0].identity.num_params or 0)
    chosen = select(sel.strategy, inputs, budget, sel.k, sel.seed)
    del inputs, assigned, labels
    valid_idx, fit_idx = choose_valid(sel, n_users, chosen)
    stats_cost.wall_s = time.perf_counter() - t0
    log(f"selection {sel.strategy}: {budget} of {n_users:,} users (K={sel.k}), {len(valid_idx)} validation users, "
        f"{stats_cost.wall_s:.1f}s")

    # 3. fits: only the fit users' prompts and records reach the driver
    fit_users = users[fit_idx]
    fit_inputs = [ix.rows(fit_users) for ix in indexes]
    # in a Ray task: the filtered scan decompresses whole row groups (~60 MB a million records), never the driver
    fit_records = ray.get(_user_records.remote(records_path, fit_users, ["train", "valid"], cfg.storage))
    train_recs = fit_records[(fit_records["split"] == "train") & fit_records["user_id"].isin(users[chosen])]
    valid_recs = fit_records[(fit_records["split"] == "valid") & fit_records["user_id"].isin(users[valid_idx])]
    del fit_records, indexes
    target = load_model(cfg.target)
    plm = PromptedLM(target, template, l, texts, cfg.target.prefix_cache_mib)
    head_state, head_cfg = stores[0].read_head()
    source_dims = [s.manifest.hidden_size for s in stores]
    reference = _reference_rows.remote(records_path, cfg.storage, task)  # runs beside the fits
    sources = [vars(s.identity) for s in stores]
    methods, costs, fits = {}, {}, {}
    adapter_path = cfg.adapter_path.format(output=output)

    def fit_adapter(name: str, architecture: AdapterConfig, path: str):
        mapping = PromptAdapter(source_dims, target.hidden_size, architecture, scales, plm.embed_rms,
                                seed=cfg.fit.seed)
        log(f"fit {name} ({num_parameters(mapping):,} parameters) on {len(train_recs)} records")
        fit = fit_fn if name == "puma" or cfg.baselines.fits_on == "engine" else fit_mapping
        result = fit(plm, task, mapping, fit_inputs, fit_users, train_recs, valid_recs,
                        new_head(head_state, head_cfg, task), cfg.fit, log=log, name=name)
        meta = {"sources": sources, "target": vars(target.identity), "prompt_length": l, "task": task,
                "template": to_dict(template), "fit": to_dict(cfg.fit), "history": result.history,
                "best_epoch": result.best_epoch, "data": {"records": records_path, "users": n_users},
                "selection": {**to_dict(sel), "budget": budget, "users_total": n_users},
                "provenance": provenance(to_dict(cfg))}
        save_adapter(path, result.mapping, result.head, head_config(task, result.head), meta, cfg.storage)
        log(f"evaluate {name} on the test split ({cfg.engine.actors} actors)")
        t = time.perf_counter()
        methods[name] = evaluate_on_ray(PromptSource("adapter", path, tuple(s.path for s in stores)), cfg.target,
                                        test, texts, task, template=template, **evaluation)
        log(f"evaluated {name} on the test split: {methods[name][metric]:.4f} {metric} "
            f"({time.perf_counter() - t:.0f}s)")
        fits[name], costs[name] = result, stats_cost.merge(result.cost).to_dict()

    fit_adapter("puma", cfg.adapter, adapter_path)
    if cfg.baselines.linear:
        fit_adapter("linear", AdapterConfig(kind="linear"), f"{output}/baselines/linear-adapter")
    if cfg.baselines.source:
        for i, (src, store) in enumerate(zip(cfg.sources, stores)):
            name = "source" if i == 0 else f"source_{i}"
            log(f"evaluate {name} on the test split ({cfg.engine.actors} actors)")
            t = time.perf_counter()
            methods[name] = evaluate_on_ray(PromptSource("store", store.path), src.model, test, texts, task,
                                            template=template, **evaluation)
            log(f"evaluated {name} on the test split: {methods[name][metric]:.4f} {metric} "
                f"({time.perf_counter() - t:.0f}s)")
    if cfg.baselines.full_retrain:
        log(f"full retraining on the target (every user's prompt from scratch, Ray Train, "
            f"{cfg.engine.num_workers} worker(s))")
        full = eq1.train("full-retrain", cfg.target, target, cfg.baselines.full_retrain_train,
                         f"{output}/full-retrain-store", users, template)
        methods["full_retrain"], costs["full_retrain"] = full["methods"]["store"], full["cost"]["train_prompts"]
    reference = ray.get(reference)

    # 5. conversion
    target_path = cfg.target_store.format(output=output)
    log(f"convert every user → {target_path}")
    conversion = convert_everyone(cfg, adapter_path, [s.path for s in stores], target_path, methods["puma"],
                                  convert_runner, log)
    costs["puma"]["convert_wall_s"] = conversion["wall_s"]
    data = {"name": cfg.data.options.get("name", "parquet"), "task": task, "users": n_users, "items": len(items),
            "records": counts, "dropped_without_common_prompt": dropped}
    return migration_report(
        cfg, task=task, sources=sources, target=vars(target.identity), budget=budget, users=users, chosen=chosen,
        valid_idx=valid_idx, methods=methods, reference=reference, costs=costs, metric=metric,
        target_path=target_path, adapter_path=adapter_path, conversion=conversion, source_reports=source_reports,
        fits=fits,
        data=data, wall_s=time.perf_counter() - t_start, driver="lean")

