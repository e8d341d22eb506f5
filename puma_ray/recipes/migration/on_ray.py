"""The Ray executor (`engine.driver: lean`, millions of users): the driver holds per-user rows and the fit users'
prompts and records, never the records table or the prompt matrix.

    sources               one Ray Data groupby gives each user's record counts and train-label variance
                          (ray_layer/user_rows.py); stores opened and indexed by their user_id columns (StoreIndex);
                          a missing store trained by Eq. 1 on Ray Train (ray_layer/prompt_train.py)
    selection_statistics  K-means on a sample of the prompts in the driver; every store shard assigned, and the
                          prompt scale summed, by an actor pool (ray_layer/shard_pass.py); the source loss per user
                          by the evaluation actors
    fit                   the fit users' prompts (StoreIndex.rows) and records (a Parquet filter in a Ray task)
    evaluation            every method on the test split by an actor pool (ray_layer/evaluate.py: a store, or an
                          adapter mapping the source stores in the actor); the reference rows in a Ray task
    gate                  each actor holds the old system and the new and returns per-user loss sums of its block
                          of validation records (ray_layer/gate.py); the driver adds rows per user
What needs the whole prompt matrix or every record in one process is refused up front with one line (`check_lean`):
the PCA and farthest-point strategies (every prompt at once) and the random-init baseline.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from puma_ray.artifacts.store import PromptStore, StoreError
from puma_ray.artifacts.store_index import StoreIndex, sorted_member
from puma_ray.config import ConfigError, ModelConfig, PromptTrainConfig, TemplateConfig, task_template, to_dict
from puma_ray.fs import absolute, is_remote, join
from puma_ray.models.backbone import Backbone
from puma_ray.ray_layer.evaluate import PromptSource, RecordFiles, evaluate_on_ray, source_loss_on_ray
from puma_ray.ray_layer.gate import gate_sums_on_ray
from puma_ray.ray_layer.prompt_train import train_store_on_ray
from puma_ray.ray_layer.shard_pass import lean_clusters, lean_ffn_clusters, shard_pass, source_plm
from puma_ray.ray_layer.user_rows import SPLITS, UserRows, joined_users, per_user_rows, reference_rows, user_records
from puma_ray.recipes.runs import provenance
from puma_ray.selection.strategies import NEEDS, SelectionInput
from puma_ray.tasks import get_task
from puma_ray.training.cost import Cost
from puma_ray.training.memory import return_freed_memory

from .config import MigrateJobConfig
from .executor import DataRead, Executor, Joined, Run
from .handles import FitData, Fits, Fitted, Selection, Sources, Statistics

# strategies whose features this executor computes: cluster labels of the prompts and of the FFN features, the
# label variance and the source loss (actors)
LEAN_STRATEGIES = ("random", "variance_bucketing", "loss_bucketing", "kmeans_stratified", "kmeans_variance",
                   "kmeans_loss", "ffn_kmeans", "ffn_kmeans_loss", "ffn_kmeans_variance")
CLUSTERED = ("kmeans_stratified", "kmeans_variance", "kmeans_loss")


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


@dataclass
class RecordRows:
    """The records as this executor holds them: their files, and one row per user (before the join: every user
    with records; after: the joined users' train-label variance only)."""
    path: str
    rows: UserRows | None
    texts: dict  # item_id -> text, from the items file
    variance: np.ndarray | None = None  # aligned with Sources.users


class OnRay(Executor):
    def __init__(self, fit_fn, convert_runner):
        self.fit_fn, self.convert_runner = fit_fn, convert_runner

    def check(self, cfg: MigrateJobConfig) -> None:
        check_lean(cfg)

    def report_fields(self) -> dict:
        return {"driver": "lean"}

    @staticmethod
    def _evaluation(cfg: MigrateJobConfig) -> dict:
        return {"actors": cfg.engine.actors, "cpus_per_actor": cfg.engine.cpus_per_actor,
                "gpus_per_actor": cfg.engine.gpus_per_actor, "batch_size": cfg.fit.eval_batch_size,
                "storage": cfg.storage}

    def read_data(self, run: Run) -> DataRead:
        cfg = run.cfg
        records_path = absolute(cfg.data.paths["records"])  # Train workers and actors read it from their own cwd
        rows = per_user_rows(records_path, cfg.storage)
        items_path = cfg.data.paths["items"]
        items = pd.read_parquet(items_path, columns=["item_id", "text"], storage_options=(
            cfg.storage.fsspec_kwargs() or None) if is_remote(items_path) else None)
        texts = dict(zip(items["item_id"].astype(str), items["text"]))
        return DataRead(RecordRows(records_path, rows, texts), cfg.data.options.get("task", "rating"),
                        texts, len(rows.users))

    def train_prompts(self, run: Run, name: str, model: ModelConfig, backbone: Backbone, train: PromptTrainConfig,
                      path: str, records: RecordRows, users: np.ndarray | None,
                      template: TemplateConfig | None) -> dict:
        """Eq. 1 on Ray Train (each worker owning its users' prompts), then the store on the test split by the
        actor pool: the report shape recipes.train_prompts.train_store gives in process."""
        cfg, task = run.cfg, run.cfg.data.options.get("task", "rating")
        texts, template = records.texts, task_template(template, task)
        run.log(f"  Eq. 1 on Ray Train, {cfg.engine.num_workers} worker(s)")
        out = train_store_on_ray(
            path, model, backbone.identity.fingerprint, backbone.identity, template, texts, task,
            records.rows.users if users is None else users, records.path, train, cfg.engine,
            cfg.engine.storage_path or join(run.output, "train"),
            f"{cfg.engine.run_name or os.path.basename(run.output.rstrip('/'))}-{name}",
            shard_rows=cfg.store.shard_rows, storage=cfg.storage, overwrite=cfg.store.overwrite,
            lineage={"kind": "trained", "data": records.path, "trainer": "puma_ray.ray_layer.prompt_train"},
            provenance=provenance(to_dict(cfg)), log=lambda m: run.log("  " + m))
        test = evaluate_on_ray(PromptSource("store", path), model, RecordFiles((records.path,), "test"), texts, task,
                               template=template, log=run.log, **self._evaluation(cfg))
        metric = get_task(task).primary
        run.log(f"  {name} store: test {metric} {test[metric]:.4f}")
        return {"methods": {"store": test}, "cost": {"train_prompts": out["cost"].to_dict()},
                "training": {"history": out["history"], "best_epoch": out["best_epoch"], "valid": out["valid"]}}

    def join(self, run: Run, stores: list[PromptStore], data: DataRead) -> Joined:
        cfg, rows = run.cfg, data.records.rows
        if len({s.manifest.prompt_length for s in stores}) > 1:
            raise StoreError("aggregated sources must share the prompt length l")
        indexes = [StoreIndex(s) for s in stores]
        users, dropped = joined_users(indexes, cfg.sources_missing_policy)
        without = rows.users[~sorted_member(users, rows.users)]  # both sorted: no concatenated copy to sort
        if len(without):  # every record's user is evaluated: a user without a prompt is an error
            raise StoreError(f"user {str(without[0])!r} has records but no prompt in the source store(s) "
                             f"({len(without)} user(s) in all)")
        counts = {split: int(rows.counts[split].sum()) for split in SPLITS}
        run.log(f"data {data.records.path}: {len(users):,} users with a prompt, records {counts} "
                f"(read by Ray Data; the driver holds {len(rows.users):,} per-user rows)")
        records = RecordRows(data.records.path, None, data.texts, rows.variance_of(users))  # the per-user rows end here
        summary = {"name": cfg.data.options.get("name", "parquet"), "task": data.task, "users": len(users),
                   "items": len(data.texts), "records": counts, "dropped_without_common_prompt": dropped}
        return Joined(users, indexes, records, summary)

    def statistics(self, run: Run, sources: Sources) -> Statistics:
        cfg, sel, users, indexes = run.cfg, run.cfg.selection, sources.users, sources.prompts
        inputs = SelectionInput(users, None, variance=sources.records.variance, options={k: getattr(sel, k) for k in (
            "kmeans_sample", "pca_components", "global_bins", "cluster_bins")})
        labels, model = (lean_clusters(indexes, users, sel.k, sel.seed, sel.kmeans_sample)
                         if sel.strategy in CLUSTERED else (None, None))
        ffn_labels, ffn_model = (lean_ffn_clusters(source_plm(cfg.sources[0].model, sources.stores[0]), indexes[0],
                                                   users, sel.k, sel.seed, sel.kmeans_sample)
                                 if "ffn" in NEEDS[sel.strategy] else (None, None))
        assigned, ffn_assigned, scales = shard_pass(
            sources.stores, users, model, cfg.storage, cfg.engine.actors, cfg.engine.cpus_per_actor,
            ffn={"model": cfg.sources[0].model, "kmeans": ffn_model} if ffn_model is not None else None)
        inputs.clusters = labels if labels is not None else (assigned if model is not None else None)
        inputs.ffn_clusters = ffn_labels if ffn_labels is not None else (ffn_assigned if ffn_model is not None
                                                                         else None)
        return_freed_memory()  # the shard pass's batches of ids
        cost = Cost()
        if "loss" in NEEDS[sel.strategy]:  # the source model's loss per user, on the actors
            inputs.loss, cost.forward_records, cost.tokens_forward = source_loss_on_ray(
                sources.stores[0].path, cfg.sources[0].model, RecordFiles((sources.records.path,), "train"),
                sources.texts, sources.task, users, template=sources.template, max_records=sel.loss_records_per_user,
                seed=sel.seed, **self._evaluation(cfg))
            cost.flops_per_token = 2.0 * (sources.backbones[0].identity.num_params or 0)
        return Statistics(inputs, cost, scales)

    def fit_data(self, run: Run, sources: Sources, selection: Selection) -> FitData:
        users = sources.users
        fit_users = users[selection.fit_idx]
        records = user_records(sources.records.path, fit_users, ["train", "valid"], run.cfg.storage)
        train = records[(records["split"] == "train") & records["user_id"].isin(users[selection.chosen])]
        valid = records[(records["split"] == "valid") & records["user_id"].isin(users[selection.valid_idx])]
        return FitData(fit_users, [ix.rows(fit_users) for ix in sources.prompts], train, valid)

    def _on_actors(self, run: Run, sources: Sources, prompts: PromptSource, model: ModelConfig,
                   split: str = "test") -> dict:
        return evaluate_on_ray(prompts, model, RecordFiles((sources.records.path,), split), sources.texts,
                               sources.task, template=sources.template, log=run.log, **self._evaluation(run.cfg))

    def evaluate_fitted(self, run: Run, sources: Sources, fits: Fits, fitted: Fitted, split: str = "test") -> dict:
        paths = tuple(s.path for s in sources.stores)
        return self._on_actors(run, sources, PromptSource("adapter", fitted.adapter, paths), run.cfg.target, split)

    def evaluate_source(self, run: Run, sources: Sources, i: int) -> dict:
        return self._on_actors(run, sources, PromptSource("store", sources.stores[i].path), run.cfg.sources[i].model)

    def reference(self, run: Run, sources: Sources) -> dict:
        return reference_rows(sources.records.path, run.cfg.storage, sources.task)

    def gate_sums(self, run: Run, sources: Sources, fits: Fits, target_store: str) -> pd.DataFrame:
        """The in-process gate's sums (InProcess.gate_sums) from the actors: the first source model + its store
        against the target + the converted store on every user's validation records; users the conversion
        rejected are not gated."""
        cfg = run.cfg
        return gate_sums_on_ray((PromptSource("store", sources.stores[0].path), cfg.sources[0].model),
                                (PromptSource("store", target_store), cfg.target),
                                RecordFiles((sources.records.path,), "valid"), sources.texts, sources.task,
                                template=sources.template, **self._evaluation(cfg))
