"""Train a personalization store on one model (Eq. 1): the source system, and the full-retraining baseline.

Lifecycle: load data → load the frozen model → train all prompts (early stop on valid) → evaluate on test beside
the reference predictors → write the store (manifest last) → report.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from puma_ray.artifacts.store import write_store
from puma_ray.config import (
    DataConfig,
    ModelConfig,
    PromptTrainConfig,
    StoreConfig,
    TemplateConfig,
    task_template,
    to_dict,
)
from puma_ray.data import Dataset, load_dataset
from puma_ray.fs import StorageOptions, join
from puma_ray.models.backbone import load_model
from puma_ray.models.heads import head_config
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.recipes.runs import provenance
from puma_ray.tasks import get_task
from puma_ray.training.evaluate import evaluate
from puma_ray.training.prompts import PromptTrainResult, train_prompts
from puma_ray.training.records import RecordSet
from puma_ray.training.reference import reference_metrics


@dataclass
class TrainPromptsJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    template: TemplateConfig | None = None  # None: the paper's template for the dataset's task
    train: PromptTrainConfig = field(default_factory=PromptTrainConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    storage: StorageOptions = field(default_factory=StorageOptions)
    store_path: str | None = None  # None: <output>/store
    threads: int | None = None  # torch CPU threads; None: all this process may use


def item_texts(ds: Dataset) -> dict[str, str]:
    return dict(zip(ds.items["item_id"], ds.items["text"]))


def train_store(cfg: TrainPromptsJobConfig, ds: Dataset, store_path: str, log=print,
                extra_provenance: dict | None = None) -> tuple[dict, PromptTrainResult]:
    """Trains every user's prompt of `ds` on cfg.model and writes the store; returns (report, result)."""
    template = task_template(cfg.template, ds.task)
    t0 = time.perf_counter()
    backbone = load_model(cfg.model)
    load_s = time.perf_counter() - t0
    log(f"model {backbone.identity.describe()}: {backbone.identity.num_params:,} parameters, loaded in {load_s:.1f}s")
    plm = PromptedLM(backbone, template, cfg.train.prompt_length, item_texts(ds), cfg.model.prefix_cache_mib)
    users = ds.users
    result = train_prompts(plm, ds.task, ds.split("train"), ds.split("valid"), users, cfg.train, log=log)
    prompts = result.prompts

    def prompts_for(idx):
        import torch
        return torch.from_numpy(prompts[idx.numpy()])

    test = ds.split("test")
    test_metrics = evaluate(plm, result.head, ds.task, prompts_for, RecordSet.from_frame(test, users),
                            cfg.train.eval_batch_size)
    if plm.prefix_cache is not None:
        log(plm.prefix_cache.stats.describe())
    refs = reference_metrics(ds.task, ds.split("train"), test)
    metric = get_task(ds.task).primary
    report = {
        "task": ds.task,
        "model": vars(backbone.identity),
        "data": ds.summary(),
        "methods": {"store": test_metrics, **refs},
        "primary_metric": metric,
        "training": {"history": result.history, "best_epoch": result.best_epoch, "valid": result.valid,
                     "init_correlation": result.init_correlation},
        "cost": {"train_prompts": result.cost.to_dict()},
        "store": store_path,
    }
    write_store(store_path, backbone.identity, users, prompts, result.head.state_dict(),
                head_config(ds.task, result.head), template=to_dict(template), task=ds.task,
                shard_rows=cfg.store.shard_rows, storage=cfg.storage, overwrite=cfg.store.overwrite,
                lineage={"kind": "trained", "data": ds.name, "trainer": "puma_ray.training.prompts"},
                provenance={**provenance(to_dict(cfg)), "data": ds.provenance, "test": test_metrics,
                            **(extra_provenance or {})})
    return report, result


def format_methods(methods: dict, task: str) -> str:
    keys = get_task(task).metrics
    lines = [f"{'method':<16}" + "".join(f"{k:>10}" for k in keys)]
    for name, m in methods.items():
        lines.append(f"{name:<16}" + "".join(f"{m.get(k, float('nan')):>10.4f}" for k in keys))
    return "\n".join(lines)


def run(cfg: TrainPromptsJobConfig, output: str, log=print) -> dict:
    ds = load_dataset(cfg.data, cfg.storage)
    log(f"data {ds.summary()}")
    from puma_ray.recipes.foundation import resolve_model
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model, ds, cfg.template, log))
    store_path = cfg.store_path or join(output, "store")
    report, _ = train_store(cfg, ds, store_path, log=log)
    report["provenance"] = provenance(to_dict(cfg))
    log(format_methods(report["methods"], ds.task))
    if report["training"].get("init_correlation") is not None:  # the store's signal against its random start
        log(f"trained prompts' correlation with their random start: {report['training']['init_correlation']:.3f}")
    return report

