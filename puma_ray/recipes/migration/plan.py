"""`--plan`: what a migration will do and spend, before it spends anything.

From the config and the records (counts per user and split only) it lists every stage with what it reads and
writes, its users and records, and its LLM record passes (forward + backward records through an LLM, counted as
the loops count them: a training epoch is 2 x its records, each validation is 1 x the validation records). Those
are exact where the users are known: always for Eq. 1, evaluation and the gate; for the fits when the source stores
exist and the strategy reads no LLM (the selection is then run here: K-means on the prompts, no training), else
estimated from the mean records per user. Fits and Eq. 1 count every epoch: early stopping can only lower them.
FLOPs = passes x tokens per record (the template on a sample of records) x 2 x the model's parameters; wall =
passes / the records per second this machine measures on a few batches of the target (forward + backward), plus
the measured start-up of a Ray Train run per fit on the Ray engine. Nothing is trained and nothing is written.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd
import torch

from puma_ray.config import ModelConfig, PromptTrainConfig, task_template
from puma_ray.data import load_dataset
from puma_ray.models.backbone import load_model
from puma_ray.models.heads import make_head, task_loss
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.selection.strategies import NEEDS, resolve_budget
from puma_ray.training.records import RecordSet, forward_batch

from .config import MigrateJobConfig
from .stage_records import store_exists

RAY_TRAIN_START_S = 30.0  # one Ray Train run's start-up on 2 CPU cores, measured 20-45 s (docs/measurements.md)
CALIBRATION_RECORDS = 576  # 9 batches of 64 through a model (forward + backward), the first not timed (warm-up)


@dataclasses.dataclass
class ModelFacts:
    folder: str | None  # None: a foundation not pretrained yet (the run pretrains it first)
    params: int = 0
    tokens_per_record: float = 0.0
    records_per_s: float = 0.0  # forward + backward, batch 64, this process's threads
    hidden_size: int = 0


def model_facts(model: ModelConfig, ds, template, l: int, texts: dict, rate: bool) -> ModelFacts:
    from puma_ray.recipes.foundation import cached_model
    folder = cached_model(model, ds, template)
    if folder is None:
        return ModelFacts(None)
    backbone = load_model(dataclasses.replace(model, name=folder, foundation=None))
    plm = PromptedLM(backbone, task_template(template, ds.task), l, texts, 0)
    sample = ds.split("train").head(CALIBRATION_RECORDS)
    facts = ModelFacts(folder, int(backbone.identity.num_params or 0),
                       float(plm.tokens_per_record(sample["item_id"].astype(str).tolist())), 0.0,
                       backbone.hidden_size)
    if rate:
        users = np.unique(sample["user_id"].to_numpy(dtype=str))
        records = RecordSet.from_frame(sample, users)
        prompts = torch.zeros(len(users), l, backbone.hidden_size, requires_grad=True)
        head, timed, start = make_head(ds.task), 0, 0.0
        for i, batch in enumerate(records.batches(64, np.random.default_rng(0))):
            if i == 1:
                start = time.perf_counter()
            logits, _ = forward_batch(plm, lambda idx: prompts[idx], batch)
            task_loss(ds.task, head, logits, torch.from_numpy(batch.labels))[0].backward()
            timed += len(batch) if i >= 1 else 0
        facts.records_per_s = 2 * timed / max(time.perf_counter() - start, 1e-9)  # fwd + bwd = 2 passes
    return facts


def eq1_passes(train: PromptTrainConfig, n_train: int, n_valid: int) -> int:
    """Eq. 1 (every user's prompt on one model): each epoch 2 x its sampled records + the validation records
    (the store's test evaluation is counted with the evaluation, as the report does)."""
    per_epoch = min(n_train, train.max_train_records) if train.max_train_records else n_train
    return train.epochs * (2 * per_epoch + n_valid)


def plan_migration(cfg: MigrateJobConfig, output: str, log=print, measure_rate: bool = True, ds=None,
                   models: bool = True) -> dict:
    """The plan (module docstring). `ds`: the records already read; `models=False`: counts only (no model loaded,
    no selection made, no FLOPs nor wall): what a running migration's ETA reads."""
    ds = ds if ds is not None else load_dataset(cfg.data, cfg.storage)
    splits = {s: ds.split(s) for s in ("train", "valid", "test")}
    per_user = pd.DataFrame({s: f.groupby("user_id").size() for s, f in splits.items()}).fillna(0).astype(int)
    users = np.sort(per_user.index.to_numpy(dtype=str))
    per_user = per_user.loc[users]
    n_users, sel = len(users), cfg.selection
    budget = resolve_budget(sel.budget, n_users)
    n_valid_users = min(n_users - budget, resolve_budget(sel.valid_users, n_users, "selection.valid_users")) \
        if budget < n_users else budget
    stores = [s.store.format(output=output) for s in cfg.sources]
    missing = [p for p in stores if not store_exists(p, cfg.storage)]
    template = cfg.template
    l = cfg.sources[0].prepare.prompt_length if missing and cfg.sources[0].prepare else 1  # the store's l
    if not missing:
        from puma_ray.artifacts.store import PromptStore
        l = PromptStore.open(stores[0], cfg.storage).manifest.prompt_length
    from puma_ray.recipes.train_prompts import item_texts
    texts = item_texts(ds)
    target = model_facts(cfg.target, ds, template, l, texts, measure_rate) if models else ModelFacts(None)
    source = model_facts(cfg.sources[0].model, ds, template, l, texts, measure_rate) if models else ModelFacts(None)
    mean = per_user.mean()
    exact_users = models and not missing and not (set(NEEDS[sel.strategy]) & {"loss", "ffn"})
    if exact_users:  # the run's own selection (no LLM, no training): exact fit records
        chosen, valid = _selection(cfg, output, users, ds)
        fit_train = int(per_user["train"].iloc[chosen].sum())
        fit_valid = int(per_user["valid"].iloc[valid].sum())
    else:
        fit_train, fit_valid = int(round(budget * mean["train"])), int(round(n_valid_users * mean["valid"]))
    totals = {s: int(per_user[s].sum()) for s in ("train", "valid", "test")}
    fit_passes = cfg.fit.epochs * (2 * fit_train + fit_valid)
    stats = 0
    if "loss" in NEEDS[sel.strategy]:
        stats += int(np.minimum(per_user["train"], sel.loss_records_per_user).sum())
    if "ffn" in NEEDS[sel.strategy]:
        stats += n_users
    base = cfg.baselines
    methods = ["puma"] + [m for m, on in (("linear", base.linear), ("random_init", base.random_init)) if on]
    methods += [f"candidate {spec}" for spec in base.candidates]
    sources_evaluated = len(cfg.sources) if base.source else 0
    stages = [
        _stage("sources", f"data ({n_users:,} users), {len(stores)} source store(s)",
               ", ".join(missing) or "nothing (stores exist)", n_users, sum(totals.values()),
               sum(eq1_passes(s.prepare, totals["train"], totals["valid"])
                   for s, p in zip(cfg.sources, stores) if p in missing and s.prepare), True, source),
        _stage("selection_statistics", f"source prompts; {', '.join(NEEDS[sel.strategy]) or 'nothing more'}",
               "ledger", n_users, totals["train"] if stats else 0, stats, True, source),
        _stage("selection", f"{sel.strategy}, K={sel.k}", "ledger", budget + n_valid_users, 0, 0, True, None),
        _stage("fit", f"{budget:,} users' train + {n_valid_users:,} users' valid records", cfg.adapter_path,
               budget, fit_train, fit_passes, exact_users, target, fits=1),
    ]
    for name in ("linear", "random_init"):
        on = getattr(base, name)
        stages.append(_stage(name, "as the fit", "baselines/" if on else "-", budget if on else 0,
                             fit_train if on else 0, fit_passes if on else 0, exact_users, target, fits=int(on)))
    n_more = len(base.candidates)
    n_adapters = 1 + int(base.linear) + n_more if cfg.ship == "validation" else 1
    stages.append(_stage("candidates", ", ".join(base.candidates) or "none", "baselines/" if n_more else "-",
                         budget if n_more else 0, fit_train * n_more, fit_passes * n_more, exact_users, target,
                         fits=n_more))
    full = eq1_passes(base.full_retrain_train, totals["train"], totals["valid"])
    # a store trained here is evaluated on the test records too (source stores first, then full retraining)
    eq1_stores = len(missing) + int(base.full_retrain)
    stages += [
        _stage("full_retrain", "every user's records", "full-retrain-store" if base.full_retrain else "-",
               n_users if base.full_retrain else 0, totals["train"] if base.full_retrain else 0,
               full if base.full_retrain else 0, True, target, fits=int(base.full_retrain)),
        _stage("evaluation", f"test records x {len(methods)} method(s) on the target + {sources_evaluated} source(s)"
               f" + {eq1_stores} store(s) trained here", "ledger", n_users, totals["test"],
               totals["test"] * (len(methods) + sources_evaluated + eq1_stores), True, target),
        # `ship: validation` first scores each adapter (PUMA, linear, candidates) on every user's valid records
        _stage("conversion", f"valid records x {n_adapters} adapter(s) to choose, then every prompt through the "
               "shipped adapter (no LLM)" if n_adapters > 1 else "every prompt through the shipped adapter (no LLM)",
               cfg.target_store, n_users, totals["valid"] if n_adapters > 1 else 0,
               totals["valid"] * n_adapters if n_adapters > 1 else 0, True, target if n_adapters > 1 else None),
        _stage("gate", "valid records, old system + new", "gate/users.parquet" if cfg.gate.enabled else "-",
               n_users if cfg.gate.enabled else 0, totals["valid"], 2 * totals["valid"] if cfg.gate.enabled else 0,
               True, target),
    ]
    ray = cfg.engine.kind == "ray"
    for stage in stages:  # a Ray Train start-up per fit on the Ray engine (baselines fitted locally pay none)
        local = stage["stage"] in ("linear", "random_init", "candidates") and base.fits_on == "local"
        stage["fits"] = stage["fits"] if ray and not local else 0
        stage["writes"] = stage["writes"].format(output=output)
    for stage in stages:
        facts = stage.pop("facts")
        if facts is not None and facts.folder and facts.params:
            stage["flops"] = float(stage["llm_record_passes"] * facts.tokens_per_record * 2 * facts.params)
        rate = (source if facts is source else target).records_per_s
        if cfg.engine.driver == "lean" and stage["stage"] in ("selection_statistics", "evaluation", "gate"):
            rate *= cfg.engine.actors  # the Ray executor's passes over every user run on its actor pool
        if rate:
            stage["wall_s"] = stage["llm_record_passes"] / rate + RAY_TRAIN_START_S * stage["fits"]
        del stage["fits"]
    memory = _memory(cfg, n_users, totals, l, source, target)

    return {"users": n_users, "records": totals, "budget": budget, "validation_users": n_valid_users,
            "fit_users_exact": exact_users, "target": vars(target), "source": vars(source),
            "missing_source_stores": missing, "stages": stages, "memory_mib": memory,
            "llm_record_passes": sum(s["llm_record_passes"] for s in stages),
            "wall_s": sum(s.get("wall_s", 0.0) for s in stages) if target.records_per_s else None,
            "ray_train_start_s": RAY_TRAIN_START_S if ray else 0.0}


def _stage(name, reads, writes, users, records, passes, exact, facts, fits=0) -> dict:
    return {"stage": name, "reads": reads, "writes": writes, "users": int(users), "records": int(records),
            "llm_record_passes": int(passes), "exact": bool(exact), "facts": facts, "fits": fits}


def _selection(cfg: MigrateJobConfig, output: str, users: np.ndarray, ds) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, valid) indices into `users`: the selection the run will make, from the existing source stores,
    through the in-process executor's own statistics (in_process.user_statistics) on the records already read."""
    from puma_ray.artifacts.store import PromptStore
    from puma_ray.conversion.run import join_sources
    from puma_ray.selection.strategies import select

    from .in_process import user_statistics
    from .stages import choose_valid
    stores = [PromptStore.open(s.store.format(output=output), cfg.storage) for s in cfg.sources]
    joined = join_sources(stores, cfg.sources_missing_policy, cfg.convert.max_prompt_scale)
    keep = np.isin(joined.users, users)  # the run's users: a prompt in every source and records
    joined = dataclasses.replace(joined, users=joined.users[keep], prompts=[p[keep] for p in joined.prompts])
    sel = cfg.selection
    inputs, _ = user_statistics(sel, set(NEEDS[sel.strategy]) & {"variance"}, joined, ds, None, None, ds.task)
    chosen = select(sel.strategy, inputs, resolve_budget(sel.budget, len(joined.users)), sel.k, sel.seed)
    valid, _ = choose_valid(sel, len(joined.users), chosen)
    at = pd.Index(users).get_indexer(joined.users)
    return at[chosen], at[valid]


LIBRARIES_MIB = 700  # torch + transformers + pyarrow (+ Ray's client) in a process: 600-700 MB measured
LEAN_BYTES_PER_USER = 200  # the lean driver's per-user rows: 162 B/user measured 100k -> 1M (docs/measurements.md)
RECORD_BYTES = 120  # a record row in pandas with its strings


def _memory(cfg, n_users, totals, l, source: ModelFacts, target: ModelFacts) -> dict:
    """MiB, rough: what dominates each process (fp32 weights, the prompt tables the driver holds, the records)."""
    mib = 1 / 2 ** 20
    weights = 4 * (source.params + target.params) * mib
    if cfg.engine.driver == "lean":
        held = n_users * LEAN_BYTES_PER_USER * mib
    else:  # the records, and the joined source prompts (every source as wide as the first) + random_init's table
        held = (sum(totals.values()) * RECORD_BYTES
                + n_users * l * 4 * (len(cfg.sources) * source.hidden_size + target.hidden_size)) * mib
    return {"driver": round(LIBRARIES_MIB + weights + held, 1),
            "worker": round(LIBRARIES_MIB + 4 * target.params * mib, 1),
            "note": f"~{LIBRARIES_MIB} MiB of libraries per process + fp32 weights + what the driver holds; estimates"}


def format_plan(plan: dict) -> str:
    lines = [f"plan: {plan['users']:,} users, records {plan['records']}, budget {plan['budget']:,} + "
             f"{plan['validation_users']:,} validation users"
             + ("" if plan["fit_users_exact"] else " (fit records estimated from the mean per user: the source "
                "stores do not exist yet or the strategy reads the LLM)"),
             f"{'stage':<22}{'users':>9}{'records':>11}{'LLM passes':>13}{'FLOPs':>11}{'wall':>9}  writes"]
    for s in plan["stages"]:
        flops = f"{s['flops']:.2e}" if "flops" in s else "-"
        wall = f"{s['wall_s']:.0f}s" if "wall_s" in s else "-"
        lines.append(f"{s['stage']:<22}{s['users']:>9,}{s['records']:>11,}{s['llm_record_passes']:>13,}"
                     f"{flops:>11}{wall:>9}  {s['writes']}" + ("" if s["exact"] else "  (estimate)"))
    total_wall = f", wall ~{plan['wall_s'] / 60:.1f} min at {plan['target']['records_per_s']:,.0f} target " \
        "records/s measured here" if plan["wall_s"] else ""
    lines.append(f"total: {plan['llm_record_passes']:,} LLM record passes (fits at most: early stopping can "
                 f"only lower them){total_wall}")
    m = plan["memory_mib"]
    lines.append(f"memory: driver ~{m['driver']:,.0f} MiB, each Train worker ~{m['worker']:,.0f} MiB ({m['note']})")
    if plan["missing_source_stores"]:
        lines.append(f"source store(s) to train first: {', '.join(plan['missing_source_stores'])}")
    for side in ("source", "target"):
        if plan[side]["folder"] is None:
            lines.append(f"{side} foundation not cached: the run pretrains it first (minutes); FLOPs/wall left out")
    return "\n".join(lines)
