"""Repair and polish a finished migration: Eq. 1 on the TARGET model, warm-started from each user's migrated
prompt, for the users the gate flagged worse (`repair`, within a budget of users and/or LLM record passes) or
for every user (`polish`); the result is a NEW store version written through the exactly-once path
(conversion/patch.py), never an edit of the migrated store.

    read      the run's report.json, its gate table (gate/users.parquet), its target store and config; bad input
              (no report, no gate table, a user the store lacks) is one line before anything is written
    choose    repair: flagged users, the most clearly worse first (smallest p), while the plan fits the budget
    train     training/prompts.train_prompts with the migrated prompts as its start (the one epoch loop; the start
              is validated first and kept unless an epoch beats it on the chosen users' validation records); the
              head is shared with users not trained, so it stays frozen unless polish trains everyone
    write     the trained users as a patch store, then base + patch → the new version (manifest last, verifiable
              with `jobs/convert.py --verify`); provenance: run, gate table checksum, users, settings, version
    re-gate   the trained users' old system against their new one on their validation records (the migration's
              rule); test RMSE of every user before and after; passes spent beside full retraining's
Eq. 1 runs in this process (`runs_on: local`) or on Ray Train (`runs_on: ray`, ray_layer/prompt_train.py with
the same warm start); the re-gate and the test figures run in this process.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch

from puma_ray.artifacts.formats import GATE_TABLE, REPORT_JSON, sha256_hex
from puma_ray.artifacts.store import PromptStore, write_store
from puma_ray.artifacts.store_index import StoreIndex
from puma_ray.config import ConfigError, PromptTrainConfig, TemplateConfig, from_dict, to_dict
from puma_ray.conversion.patch import patch_store
from puma_ray.data import load_dataset
from puma_ray.errors import PumaError
from puma_ray.fs import StorageOptions, filesystem, join, read_json
from puma_ray.models.backbone import load_model
from puma_ray.models.heads import head_config, load_head
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.recipes.migration.config import MigrateJobConfig, resolve_foundations
from puma_ray.recipes.runs import provenance
from puma_ray.recipes.train_prompts import item_texts
from puma_ray.reports.gate import read_gate_table, write_gate_table
from puma_ray.tasks import get_task
from puma_ray.training.cost import Cost
from puma_ray.training.evaluate import evaluate
from puma_ray.training.gate import GateConfig, System, gate_from_stats, gate_summary, system_loss_sums
from puma_ray.training.prompts import train_prompts
from puma_ray.training.records import RecordSet


def _warm_train() -> PromptTrainConfig:
    # from a migrated prompt, not from noise: a few epochs at a lower rate than Eq. 1 from scratch (0.02)
    return PromptTrainConfig(epochs=3, patience=1, batch_size=128, lr=0.01)


@dataclass
class RepairJobConfig:
    run: str = ""  # the finished migration run folder (its report.json, gate/users.parquet, target store, config)
    # repair: only the users the gate flagged worse (or `users`); polish: every user of the target store
    mode: Literal["repair", "polish"] = "repair"
    # repair exactly these users instead of the gate's flagged ones (e.g. users who complained); each must be in
    # the target store
    users: list[str] = field(default_factory=list)
    # budget in users: at most this many, the most clearly worse first (smallest p); 0 = every flagged user
    max_users: int = 0
    # budget in LLM record passes (forward + backward records through the target, validation included) the
    # training may plan: users are taken in order while the plan fits; 0 = no cap. Counted as full retraining's
    max_record_passes: int = 0
    # Eq. 1 from the migrated prompts (epochs, lr, early stopping on the trained users' validation records)
    train: PromptTrainConfig = field(default_factory=_warm_train)
    # polish only: train the shared head too (every user is retrained, so no untouched user depends on it); in a
    # repair the head stays frozen, or users outside the repair would change without their prompt changing
    train_head: bool = False
    # the new store version; {output} is the job's output folder
    store: str = "{output}/store"
    # the gate's rule for the re-gate; None: the migration's own (its report's alpha, margin, min_records)
    gate: GateConfig | None = None
    # local: Eq. 1 in this process (a few flagged users: no Ray Train start-up to pay); ray: on Ray Train with the
    # migration's engine section (workers, GPUs), each worker holding its users' prompts, as full retraining runs
    runs_on: Literal["local", "ray"] = "local"
    overwrite: bool = False  # replace an earlier repair in the same output folder (patch and new version)
    threads: int | None = None  # torch CPU threads; None: all this process may use
    storage: StorageOptions = field(default_factory=StorageOptions)  # object-store endpoint and keys (s3:// paths)

    def __post_init__(self):
        if self.max_users < 0 or self.max_record_passes < 0:
            raise ConfigError("max_users and max_record_passes must be >= 0 (0: no cap)")
        if self.train_head and self.mode != "polish":
            raise ConfigError("train_head: only in polish (a repair's head is shared with users it does not train)")
        if self.users and self.mode != "repair":
            raise ConfigError("users: only in mode repair (polish trains every user)")


@dataclass
class Inputs:
    """What a finished migration run gives a repair, checked before anything is written."""
    report: dict
    migrate: MigrateJobConfig
    store: PromptStore  # the migrated target store (the base of the new version)
    gate: pd.DataFrame | None  # its gate table (repair from the gate only)
    gate_path: str | None
    gate_sha256: str | None


def _read_bytes(path: str, storage) -> bytes:
    fs, root = filesystem(path, storage)
    with fs.open(root, "rb") as f:
        return f.read()


def read_run(cfg: RepairJobConfig) -> Inputs:
    """The run folder's parts, every one checked; PumaError naming the file or the user otherwise."""
    if not cfg.run:
        raise ConfigError("run: name the finished migration run folder (run=<folder>)")
    fs, root = filesystem(cfg.run, cfg.storage)
    report_file = join(cfg.run, REPORT_JSON)
    if not fs.exists(join(root, REPORT_JSON)):
        raise PumaError(f"{report_file}: missing (not a finished migration run folder)")
    report = read_json(fs, join(root, REPORT_JSON), report_file, PumaError)
    if not isinstance(report, dict) or "store" not in report or "config" not in report.get("provenance", {}):
        raise PumaError(f"{report_file}: not a migration report (no store or provenance.config)")
    migrate = from_dict(MigrateJobConfig, report["provenance"]["config"], f"{report_file} provenance.config")
    store = PromptStore.open(report["store"], cfg.storage)
    gate = gate_path = gate_sha = None
    if cfg.mode == "repair" and not cfg.users:
        gate_path = (report.get("gate") or {}).get("table") or join(cfg.run, GATE_TABLE)
        gfs, groot = filesystem(gate_path, cfg.storage)
        if not gfs.exists(groot):
            why = (report.get("gate") or {}).get("skipped")
            raise PumaError(f"{gate_path}: gate table missing" + (f" (the run's gate was skipped: {why})"
                                                                   if why else ""))
        gate_sha = sha256_hex(_read_bytes(gate_path, cfg.storage))
        gate = read_gate_table(gate_path, cfg.storage)
        if not {"user_id", "verdict", "p_worse", "diff"} <= set(gate.columns):
            raise PumaError(f"{gate_path}: not a gate table (needs user_id, verdict, p_worse, diff)")
    named = np.asarray(cfg.users if cfg.users else ([] if gate is None else gate["user_id"]), dtype=str)
    index = StoreIndex(store)
    absent = named[~index.has(named)] if len(named) else named
    if len(absent):
        where = "users" if cfg.users else gate_path
        raise PumaError(f"{where}: user {str(absent[0])!r} is not in the target store {store.path} "
                        f"({len(absent)} user(s) in all)")
    return Inputs(report, migrate, store, gate, gate_path, gate_sha)


def planned_passes(train_counts: np.ndarray, valid_counts: np.ndarray, train: PromptTrainConfig) -> np.ndarray:
    """LLM record passes the warm-started Eq. 1 plans for the first k users, k = 1..n: per epoch a forward and a
    backward pass of each training record (at most max_train_records), one validation pass at the start and one
    per epoch. Early stopping only spends less."""
    per_epoch = np.cumsum(train_counts)
    if train.max_train_records:
        per_epoch = np.minimum(per_epoch, train.max_train_records)
    return 2 * train.epochs * per_epoch + (train.epochs + 1) * np.cumsum(valid_counts)


def choose_users(cfg: RepairJobConfig, inputs: Inputs, store_users: np.ndarray, counts: pd.DataFrame
                 ) -> tuple[np.ndarray, dict]:
    """(users to train, sorted; what the choice was). repair: the named users, or the gate's "worse" users ordered
    by p_worse (then the largest loss increase), cut by max_users and max_record_passes."""
    if cfg.mode == "polish":
        ordered = store_users
    elif cfg.users:
        ordered = np.asarray(list(dict.fromkeys(cfg.users)), dtype=str)
    else:
        worse = inputs.gate[inputs.gate["verdict"] == "worse"].sort_values(["p_worse", "diff"],
                                                                           ascending=[True, False])
        ordered = worse["user_id"].to_numpy(dtype=str)
    flagged = len(ordered)
    if cfg.max_users and cfg.mode == "repair":
        ordered = ordered[:cfg.max_users]
    plan = planned_passes(counts["train"].reindex(ordered, fill_value=0).to_numpy(),
                          counts["valid"].reindex(ordered, fill_value=0).to_numpy(), cfg.train)
    if cfg.max_record_passes:
        ordered = ordered[:int(np.searchsorted(plan, cfg.max_record_passes, side="right"))]
    planned = int(plan[len(ordered) - 1]) if len(ordered) else 0
    return np.sort(ordered), {"candidates": int(flagged), "chosen": int(len(ordered)), "planned_passes": planned,
                              "max_users": cfg.max_users, "max_record_passes": cfg.max_record_passes}


def _prompts_fn(prompts: np.ndarray):
    table = torch.from_numpy(prompts)
    return lambda idx: table[idx]


def _of_users(frame: pd.DataFrame, users: np.ndarray) -> pd.DataFrame:
    return frame[frame["user_id"].astype(str).isin(users)]


def _aligned(store: PromptStore, users: np.ndarray) -> np.ndarray:
    return StoreIndex(store).rows(users)


def run(cfg: RepairJobConfig, output: str, log=print) -> dict:
    """Repair (or polish) the run `cfg.run` into `output`: the patch store, the new version, the re-gated table
    and report.json's content (returned; the job writes it)."""
    started = time.perf_counter()
    inputs = read_run(cfg)  # every check before the first write
    mig = resolve_foundations(inputs.migrate, log)
    base = inputs.store
    ds = load_dataset(mig.data, mig.storage)
    task, metric = ds.task, get_task(ds.task).primary
    store_users = StoreIndex(base).users
    counts = ds.records[ds.records["split"].isin(["train", "valid"])].groupby(["user_id", "split"]).size() \
        .unstack(fill_value=0).reindex(columns=["train", "valid"], fill_value=0)
    counts.index = counts.index.astype(str)
    users, choice = choose_users(cfg, inputs, store_users, counts)
    log(f"{cfg.mode}: {choice['chosen']} of {choice['candidates']} candidate user(s), planned "
        f"{choice['planned_passes']:,} LLM record passes")
    if not len(users):
        raise PumaError(f"{cfg.mode}: no user to train ({choice['candidates']} candidate(s) within the budget: "
                        f"max_users {cfg.max_users}, max_record_passes {cfg.max_record_passes})")

    target = load_model(mig.target)
    base.check_model(target.identity)
    template = from_dict(TemplateConfig, base.manifest.template, f"store {base.path} template")
    texts = item_texts(ds)
    plm = PromptedLM(target, template, base.manifest.prompt_length, texts, mig.target.prefix_cache_mib)
    head, base_head = load_head(*base.read_head()), load_head(*base.read_head())  # the first may be trained
    train = dataclasses.replace(cfg.train, prompt_length=base.manifest.prompt_length)
    train_records, valid_records = (_of_users(ds.split(s), users) for s in ("train", "valid"))
    train_head = cfg.train_head and cfg.mode == "polish"

    # the trained users → a patch store, then base + patch → the new version
    patch_path, new_path = join(output, "patch-store"), cfg.store.format(output=output)
    gate_ref = {"table": inputs.gate_path, "sha256": inputs.gate_sha256} if inputs.gate_path else None
    users_sha = sha256_hex("\n".join(users).encode())
    prov = {**provenance(to_dict(cfg)), "migration_run": cfg.run, "gate_table": gate_ref, "mode": cfg.mode,
            "users": {"count": int(len(users)), "sha256": users_sha,
                      "list": users.tolist() if len(users) <= 1000 else f"{patch_path} (its user ids)"}}
    lineage = {"kind": "trained", "warm_start": base.path, "data": ds.name}
    if cfg.runs_on == "ray":  # Eq. 1 on Ray Train: each worker reads its users' migrated rows and records
        from puma_ray.data import save_dataset
        from puma_ray.ray_layer.prompt_train import train_store_on_ray
        records_path = mig.data.paths["records"] if mig.data.name == "parquet" else \
            save_dataset(ds, join(output, "data"))["records"]
        out = train_store_on_ray(
            patch_path, mig.target, target.identity.fingerprint, target.identity, template, texts, task, users,
            records_path, train, mig.engine, join(output, "train"), f"{cfg.mode}", shard_rows=mig.store.shard_rows,
            storage=cfg.storage, overwrite=cfg.overwrite,
            lineage={**lineage, "trainer": "puma_ray.ray_layer.prompt_train (warm start)"}, provenance=prov,
            log=lambda m: log("  " + m), init_store=base.path, head_state=head.state_dict(), train_head=train_head)
        spent, history, best_epoch, valid_figure = out["cost"], out["history"], out["best_epoch"], out["valid"]
    else:
        result = train_prompts(plm, task, train_records, valid_records, users, train, head=head,
                               log=lambda m: log("  " + m), init=_aligned(base, users), train_head=train_head)
        spent, history, best_epoch, valid_figure = result.cost, result.history, result.best_epoch, result.valid
        write_store(patch_path, target.identity, users, result.prompts, result.head.state_dict(),
                    head_config(task, result.head), template=base.manifest.template, task=task,
                    shard_rows=mig.store.shard_rows, storage=cfg.storage, overwrite=cfg.overwrite,
                    lineage={**lineage, "trainer": "puma_ray.training.prompts (warm start)"}, provenance=prov)
    training = {"history": history, "best_epoch": best_epoch, "valid": valid_figure, "cost": spent.to_dict(),
                "runs_on": cfg.runs_on}
    written = patch_store(base.path, patch_path, new_path, cfg.storage, overwrite=cfg.overwrite,
                          provenance={**prov, "training": training}, lineage={"mode": cfg.mode}, log=log)
    log(f"new store version {new_path}: {written['patched']} of {written['users']} users trained")

    # re-gate the trained users; test metrics of everyone before and after
    new = PromptStore.open(new_path, cfg.storage)
    rule = cfg.gate or mig.gate
    source_cfg = mig.sources[0]
    source = PromptStore.open(source_cfg.store.format(output=cfg.run), cfg.storage)
    source_plm = PromptedLM(load_model(source_cfg.model), template, base.manifest.prompt_length, texts,
                            source_cfg.model.prefix_cache_mib)
    eval_cost = Cost(flops_per_token=spent.flops_per_token)
    valid = valid_records
    old_sys = System(source_plm, load_head(*source.read_head()), _prompts_fn(_aligned(source, users)))
    new_head = load_head(*new.read_head())
    new_sys = System(plm, new_head, _prompts_fn(_aligned(new, users)))
    sums = system_loss_sums(task, RecordSet.from_frame(valid, users), old_sys, new_sys, mig.fit.eval_batch_size)
    regated = gate_from_stats(sums, rule)
    before = inputs.gate if inputs.gate is not None else _table_of(cfg.run, inputs.report, cfg.storage)
    after = regated if before is None else pd.concat(
        [before[~before["user_id"].astype(str).isin(regated["user_id"])], regated]).sort_values("user_id")
    table_path = write_gate_table(after.reset_index(drop=True), output, cfg.storage)
    test = ds.split("test")
    test_records = RecordSet.from_frame(test, store_users)
    metrics_before = evaluate(plm, base_head, task, _prompts_fn(_aligned(base, store_users)), test_records,
                              mig.fit.eval_batch_size)
    metrics_after = evaluate(plm, new_head, task, _prompts_fn(_aligned(new, store_users)), test_records,
                             mig.fit.eval_batch_size, eval_cost)

    def share_worse(table):
        return None if table is None else round(float((table["verdict"] == "worse").mean()), 4)

    costs = inputs.report.get("cost", {})
    report = {
        "mode": cfg.mode, "run": cfg.run, "store": new_path, "base_store": base.path, "patch_store": patch_path,
        "task": task, "primary_metric": metric, "choice": choice, "users_trained": int(len(users)),
        "users_sha256": users_sha,
        "test": {"before": metrics_before, "after": metrics_after,
                 "full_retrain": inputs.report.get("methods", {}).get("full_retrain")},
        "gate": {"before": {"share_worse": share_worse(before),
                            "worse": None if before is None else int((before["verdict"] == "worse").sum())},
                 "after": {**gate_summary(after, rule), "table": table_path},
                 "trained_users": {v: int((regated["verdict"] == v).sum()) for v in ("worse", "better",
                                                                                      "unchanged")}},
        "cost": {"repair": spent.to_dict(), "regate_and_test": eval_cost.to_dict(),
                 "puma": costs.get("puma"), "full_retrain": costs.get("full_retrain")},
        "training": training,
        "new_version": written, "wall_s": round(time.perf_counter() - started, 2),
        "provenance": provenance(to_dict(cfg)),
    }
    full = (costs.get("full_retrain") or {}).get("llm_record_passes")
    if full:
        report["cost"]["passes_over_full_retrain"] = round(spent.llm_record_passes / full, 4)
    return report


def _table_of(run_dir: str, report: dict, storage) -> pd.DataFrame | None:
    """The run's gate table when there is one (a repair of named users or a polish reads it for the before)."""
    path = (report.get("gate") or {}).get("table") or join(run_dir, GATE_TABLE)
    fs, root = filesystem(path, storage)
    return read_gate_table(path, storage) if fs.exists(root) else None


def format_repair(report: dict) -> str:
    m, test, gate, cost = report["primary_metric"], report["test"], report["gate"], report["cost"]
    full = test.get("full_retrain") or {}
    lines = [f"{report['mode']}: {report['users_trained']} user(s) trained → {report['store']}",
             f"test {m} (all users): before {test['before'][m]:.4f}, after {test['after'][m]:.4f}"
             + (f", full retraining {full[m]:.4f}" if m in full else ""),
             f"share of users worse than on the old system: before {gate['before']['share_worse']}, after "
             f"{gate['after']['share_worse']}",
             f"LLM record passes: {report['cost']['repair']['llm_record_passes']:,}"
             + (f" (full retraining {cost['full_retrain']['llm_record_passes']:,})" if cost.get("full_retrain")
                else "")]
    return "\n".join(lines)


def default_output(cfg: RepairJobConfig) -> str:
    """<run>/<mode>: the repair lives beside the migration it repairs."""
    return join(cfg.run, cfg.mode) if cfg.run else os.path.join("runs", cfg.mode)
