"""A migration, defined once: an ordered list of named stages, each a function of the run and of earlier stages'
outputs (named in `Stage.inputs`) to one typed output (handles.py). Where each stage's heavy work runs is the
executor's business (executor.py); what the stage computes, with which seeds, and how its cost is counted is here.

    sources               the data and the source store(s) joined on user_id (a missing store trained first)
    selection_statistics  the per-user features the strategy reads, and each source's prompt scale
    selection             `budget` training users (+ held-out validation users)
    fit                   the adapter through the frozen target (Eq. 2), saved as an artifact
    linear                the linear map d_s → d_t fitted the same way (a baseline, and a shipping candidate)
    random_init           random target prompts, the head trained on the same users (the floor)
    candidates            baselines.candidates: more adapters (widths, the skip path), fitted like the linear map
    full_retrain          every user's prompt retrained on the target (Eq. 1): the expensive upper bound
    baselines             the four above as one record (nothing runs)
    evaluation            every method and the LLM-free reference rows on the test records
    conversion            every user → the target store (manifest last) through the adapter validation ships
    gate                  each user's old system against the new on their validation records (how many got worse)
    report                report.json's content
A stage's output is dropped once no later stage reads it: the driver holds what is still needed, no more.
Each stage names the settings it reads: with its inputs' identities they name its work in the run ledger
(runner.py, ledger.py), so a rerun into the same output reuses every finished stage whose work is unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

import puma_ray.recipes.migration.stage_records as records
from puma_ray.artifacts.adapter_io import save_adapter
from puma_ray.artifacts.store import MANIFEST, PromptStore, StoreError
from puma_ray.config import TemplateConfig, from_dict, task_template, to_dict
from puma_ray.models.adapter import AdapterConfig, PromptAdapter, num_parameters, parse_adapter_spec
from puma_ray.models.backbone import load_model
from puma_ray.models.heads import head_config, load_head, make_head
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.recipes.runs import provenance
from puma_ray.reports.gate import write_gate_table
from puma_ray.selection.strategies import check_selection, resolve_budget, select
from puma_ray.tasks import get_task
from puma_ray.training.fit import FixedPrompts, fit_mapping
from puma_ray.training.gate import VERDICTS, gate_from_stats, gate_summary

from .config import SelectionConfig, candidate_name
from .executor import Executor, Run
from .handles import Baselines, Conversion, Evaluation, Fits, Fitted, Gate, Selection, Sources, Statistics
from .report import convert_everyone, migration_report
from .stage_records import store_exists


@dataclass(frozen=True)
class Stage:
    name: str  # also the name later stages read its output by
    fn: Callable  # fn(run, executor, *outputs of `inputs`) -> this stage's output
    inputs: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()  # the config keys (dotted) it reads: part of its identity in the ledger
    # ledger record: save(run, ledger, output, *inputs) -> dict; restore(run, ex, ledger, record, *inputs) ->
    # output, or None when the artifacts are not what the record says. No save: it always runs (cheap, or a load)
    save: Callable | None = None
    restore: Callable | None = None
    full_for: tuple[str, ...] = ()  # stages that need its full output, more than the record gives back
    skipped: Callable | None = None  # skipped(run) -> its output under `--skip` (None: it cannot be skipped)
    # the stages whose identity its own includes; None: `inputs`. Narrower where a stage reads an input for a
    # shared handle only (full retraining reads `fit` for the loaded target, not for the adapter)
    depends: tuple[str, ...] | None = None


def new_head(head_state: dict, head_cfg: dict, task: str):
    """A fit's starting head: the source's when the tasks agree (as the paper), else a fresh one."""
    if head_cfg["task"] == task:
        return load_head(copy.deepcopy(head_state), head_cfg)
    return make_head(task)


def choose_valid(sel: SelectionConfig, n_users: int, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(valid_idx, fit_idx): `sel.valid_users` validation users drawn (seeded) from those not chosen (all chosen if
    none is left), and chosen ∪ valid."""
    rest = np.setdiff1d(np.arange(n_users), chosen)
    n_valid = min(len(rest), resolve_budget(sel.valid_users, n_users, "selection.valid_users")) if len(rest) else 0
    valid_idx = np.sort(np.random.default_rng(sel.seed + 1).choice(rest, n_valid, replace=False)) if n_valid else chosen
    return valid_idx, np.union1d(chosen, valid_idx)


def sources(run: Run, ex: Executor) -> Sources:
    cfg, log = run.cfg, run.log
    data = ex.read_data(run)
    sel = cfg.selection  # before any training: an impossible selection is one line now, not after the stores
    check_selection(sel.budget, sel.valid_users, data.num_users)
    stores, backbones, reports = [], [], {}
    for i, src in enumerate(cfg.sources):
        path = src.store.format(output=run.output)
        backbone = load_model(src.model)
        if not store_exists(path, cfg.storage):
            if src.prepare is None:
                raise StoreError(f"source store {path} does not exist (no {MANIFEST}) and sources[].prepare is not set")
            log(f"source store {path} missing: training it on {src.model.name} first")
            reports[path] = ex.train_prompts(run, f"source-{i}", src.model, backbone, src.prepare, path, data.records,
                                             None, cfg.template)
        store = PromptStore.open(path, cfg.storage)
        store.check_model(backbone.identity)
        stores.append(store)
        backbones.append(backbone)
    joined = ex.join(run, stores, data)
    template = task_template(cfg.template, data.task) if cfg.template else from_dict(
        TemplateConfig, stores[0].manifest.template, f"store {stores[0].path} template")
    return Sources(data.task, get_task(data.task).primary, template, stores[0].manifest.prompt_length, data.texts,
                   stores, backbones, joined.users, joined.prompts, joined.records, stores[0].read_head(),
                   joined.data, reports)


def selection_statistics(run: Run, ex: Executor, src: Sources) -> Statistics:
    t0 = time.perf_counter()
    stats = ex.statistics(run, src)
    stats.cost.wall_s = time.perf_counter() - t0
    return stats


def selection(run: Run, ex: Executor, src: Sources, stats: Statistics) -> Selection:
    sel, n_users = run.cfg.selection, len(src.users)
    t0 = time.perf_counter()
    budget = resolve_budget(sel.budget, n_users)
    chosen = select(sel.strategy, stats.inputs, budget, sel.k, sel.seed)
    valid_idx, fit_idx = choose_valid(sel, n_users, chosen)
    cost = copy.copy(stats.cost)
    cost.wall_s += time.perf_counter() - t0
    run.log(f"selection {sel.strategy}: {budget} of {n_users:,} users (K={sel.k}), {len(valid_idx)} validation "
            f"users, {cost.wall_s:.1f}s")
    return Selection(budget, chosen, valid_idx, fit_idx, cost)


def _fit(run: Run, ex: Executor, src: Sources, fits: Fits, name: str, mapping, inputs: list[np.ndarray]):
    cfg = run.cfg
    run.log(f"fit {name} ({num_parameters(mapping):,} parameters) on {len(fits.data.train)} records")
    fit = ex.fit_fn if name == "puma" or cfg.baselines.fits_on == "engine" else fit_mapping
    return fit(fits.plm, src.task, mapping, inputs, fits.data.users, fits.data.train, fits.data.valid,
               new_head(*src.head, src.task), cfg.fit, log=run.log, name=name)


def _adapter(run: Run, ex: Executor, src: Sources, stats: Statistics, sel: Selection, fits: Fits, name: str,
             architecture: AdapterConfig, path: str) -> Fitted:
    """An adapter fitted on the selected users and saved at `path` (the artifact conversion and evaluation read)."""
    cfg = run.cfg
    mapping = PromptAdapter([b.hidden_size for b in src.backbones], fits.target.hidden_size, architecture,
                            stats.scales, fits.plm.embed_rms, seed=cfg.fit.seed)
    result = _fit(run, ex, src, fits, name, mapping, fits.data.inputs)
    meta = {"sources": [vars(b.identity) for b in src.backbones], "target": vars(fits.target.identity),
            "prompt_length": src.l, "task": src.task, "template": to_dict(src.template),
            "selection": {**to_dict(cfg.selection), "budget": sel.budget, "users_selected": int(sel.budget),
                          "users_total": len(src.users)},
            "fit": to_dict(cfg.fit), "history": result.history, "best_epoch": result.best_epoch, "data": src.data,
            "provenance": provenance(to_dict(cfg))}
    fitted = Fitted(result, path, meta=meta)
    save_fitted(fitted, src.task, cfg.storage)
    return fitted


def save_fitted(fitted: Fitted, task: str, storage, **more) -> None:
    """The adapter artifact of `fitted`, its meta plus `more` (conversion and the actors' evaluation read it)."""
    result = fitted.result
    save_adapter(fitted.adapter, result.mapping, result.head, head_config(task, result.head), {**fitted.meta, **more},
                 storage)


def fit(run: Run, ex: Executor, src: Sources, stats: Statistics, sel: Selection) -> Fits:
    cfg = run.cfg
    data = ex.fit_data(run, src, sel)
    target = load_model(cfg.target)
    fits = Fits(target, PromptedLM(target, src.template, src.l, src.texts, cfg.target.prefix_cache_mib), data, {})
    fits.methods["puma"] = _adapter(run, ex, src, stats, sel, fits, "puma", cfg.adapter,
                                    cfg.adapter_path.format(output=run.output))
    return fits


def linear(run: Run, ex: Executor, src: Sources, stats: Statistics, sel: Selection, fits: Fits) -> Fitted | None:
    if not run.cfg.baselines.linear:
        return None
    return _adapter(run, ex, src, stats, sel, fits, "linear", AdapterConfig(kind="linear"), records.linear_path(run))


def candidates(run: Run, ex: Executor, src: Sources, stats: Statistics, sel: Selection,
               fits: Fits) -> dict[str, Fitted]:
    """baselines.candidates: more adapters (a width, the skip path) fitted like the linear map, for the report and
    for `ship: validation` to weigh."""
    out = {}
    for spec in run.cfg.baselines.candidates:
        name = candidate_name(spec)
        out[name] = _adapter(run, ex, src, stats, sel, fits, name,
                             dataclasses.replace(run.cfg.adapter, **parse_adapter_spec(spec)),
                             records.candidate_path(run, name))
    return out


def random_target_prompts(run: Run, src: Sources, fits: Fits) -> np.ndarray:
    """Every user's random target prompt (seeded): an in-memory table by nature, and reproducible from the seed."""
    rng = np.random.default_rng(run.cfg.selection.seed)
    return (rng.uniform(-3 ** 0.5, 3 ** 0.5, (len(src.users), src.l, fits.target.hidden_size))
            * fits.plm.embed_rms).astype(np.float32)


def random_init(run: Run, ex: Executor, src: Sources, stats: Statistics, sel: Selection,
                fits: Fits) -> Fitted | None:
    if not run.cfg.baselines.random_init:
        return None
    prompts = random_target_prompts(run, src, fits)
    result = _fit(run, ex, src, fits, "random_init", FixedPrompts(), [prompts[sel.fit_idx]])
    return Fitted(result, prompts=[prompts])


def full_retrain(run: Run, ex: Executor, src: Sources, fits: Fits) -> dict | None:
    cfg = run.cfg
    if not cfg.baselines.full_retrain:
        return None
    run.log("full retraining on the target (every user's prompt from scratch)")
    run = dataclasses.replace(run, cfg=dataclasses.replace(cfg, store=run.replaced("full_retrain", cfg.store)))
    return ex.train_prompts(run, "full-retrain", cfg.target, fits.target, cfg.baselines.full_retrain_train,
                            records.full_retrain_path(run), src.records, src.users, src.template)


def baselines(run: Run, ex: Executor, lin: Fitted | None, rand: Fitted | None, more: dict[str, Fitted],
              full: dict | None) -> Baselines:
    fitted = {n: f for n, f in (("linear", lin), ("random_init", rand)) if f is not None}
    return Baselines({**fitted, **more}, full)


def evaluation(run: Run, ex: Executor, src: Sources, fits: Fits, base: Baselines) -> Evaluation:
    methods = {}

    def timed(name: str, evaluate: Callable[[], dict]) -> None:
        run.log(f"evaluate {name} on the test split")
        t = time.perf_counter()
        methods[name] = evaluate()
        run.log(f"evaluated {name} on the test split: {methods[name][src.metric]:.4f} {src.metric} "
                f"({time.perf_counter() - t:.0f}s)")

    for name, fitted in [*fits.methods.items(), *base.methods.items()]:
        timed(name, lambda f=fitted: ex.evaluate_fitted(run, src, fits, f))
    if run.cfg.baselines.source:
        for i in range(len(src.stores)):
            timed("source" if i == 0 else f"source_{i}", lambda i=i: ex.evaluate_source(run, src, i))
    if base.full_retrain is not None:
        methods["full_retrain"] = base.full_retrain["methods"]["store"]
    return Evaluation(methods, ex.reference(run, src))


def shipped_adapter(run: Run, ex: Executor, src: Sources, fits: Fits, base: Baselines) -> tuple[str, dict]:
    """Which fitted adapter converts everyone: PUMA's (`ship: puma`, the paper), or the best among PUMA and the
    linear map on every user's validation records (`validation`, the default: a migration never ships worse than
    the simplest map by the figure it may look at). Test records never enter the choice.

    Every user's validation records, not only the fit's validation users': on the default seed those 94 users'
    1,075 records ranked PUMA first (1.0112 vs 1.0186) while the test records ranked it 0.018 behind the linear
    map; 9,988 records rank two candidates far more reliably, for one forward pass of each over them."""
    task = get_task(src.task)
    adapters = {n: f for n, f in [*fits.methods.items(), *base.methods.items()] if f.adapter is not None}
    fit_valid = {n: float(f.result.valid[task.primary]) for n, f in adapters.items()}
    choice = {"rule": run.cfg.ship, "metric": task.primary, "fit_validation": fit_valid}
    if run.cfg.ship == "puma" or len(adapters) == 1:
        name, scores = "puma", fit_valid
    else:
        scores = {}
        for n, f in adapters.items():
            metrics = ex.evaluate_fitted(run, src, fits, f, split="valid")
            scores[n] = float(metrics[task.primary])
            choice["records"] = int(metrics.get("records", 0))
        name = (max if task.higher_is_better else min)(scores, key=scores.get)  # ties: PUMA (listed first)
    run.log(f"shipped adapter: {name} (validation {task.primary}"
            + (" on every user's validation records" if scores is not fit_valid else "") + ": "
            + ", ".join(f"{n} {v:.4f}" for n, v in scores.items()) + ")")
    return name, {**choice, "validation": scores, "shipped": name, "adapter": adapters[name].adapter}


def conversion(run: Run, ex: Executor, src: Sources, fits: Fits, base: Baselines, ev: Evaluation) -> Conversion:
    name, choice = shipped_adapter(run, ex, src, fits, base)
    shipped = fits.methods.get(name) or base.methods[name]
    # the artifact carries its test metrics from here on (the evaluation needed it saved without them)
    save_fitted(shipped, src.task, run.cfg.storage, metrics=ev.methods[name])
    target_path = run.cfg.target_store.format(output=run.output)
    run.log(f"convert every user → {target_path}")
    summary = convert_everyone(dataclasses.replace(run.cfg, convert=run.replaced("conversion", run.cfg.convert)),
                               shipped.adapter, [s.path for s in src.stores], target_path,
                               ev.methods[name], ex.convert_runner, run.log)
    return Conversion(target_path, summary, choice)


def gate(run: Run, ex: Executor, src: Sources, fits: Fits, conv: Conversion, base: Baselines) -> Gate:
    """Each user's old system against the new on their own validation records (never test): how many users the
    migration made worse, by the rule of training/gate.py; the table lands in the run folder. With full retraining
    in the run, its store goes through the same rule beside it (what "worse" costs without PUMA)."""
    cfg = run.cfg.gate
    if not cfg.enabled:
        return Gate({"skipped": "gate.enabled is false"})
    run.log("gate: every user's old system against the new on their validation records")
    sums = ex.gate_sums(run, src, fits, conv.target_store)
    if sums is None:
        run.log(f"gate: not available on the {type(ex).__name__} executor yet; skipped")
        return Gate({"skipped": f"not available on the {type(ex).__name__} executor yet"})
    table = gate_from_stats(sums, cfg)
    summary = {**gate_summary(table, cfg), "loss": "squared error" if src.task == "rating" else "log loss",
               "records": int(table["records"].sum()),
               "table": write_gate_table(table, run.output, run.cfg.storage)}
    run.log(f"gate: {summary['worse']} of {summary['users']} users worse, {summary['better']} better on their "
            f"validation records (alpha {cfg.alpha}); table {summary['table']}")
    full_store = records.full_retrain_path(run)
    if base.full_retrain is not None and store_exists(full_store, run.cfg.storage):
        full = gate_summary(gate_from_stats(ex.gate_sums(run, src, fits, full_store), cfg), cfg)
        summary["full_retrain"] = {k: full[k] for k in ("users", *VERDICTS, "share_worse", "too_few_records")}
        run.log(f"gate, full retraining on the same rule: {full['worse']} of {full['users']} users worse, "
                f"{full['better']} better")
    return Gate(summary)


def report(run: Run, ex: Executor, src: Sources, sel: Selection, fits: Fits, base: Baselines, ev: Evaluation,
           conv: Conversion, checked: Gate) -> dict:
    costs = {name: (f.result.cost if f.prompts is not None else sel.cost.merge(f.result.cost)).to_dict()
             for name, f in [*fits.methods.items(), *base.methods.items()]}  # fixed prompts select nothing
    if base.full_retrain is not None:
        costs["full_retrain"] = base.full_retrain["cost"]["train_prompts"]
    costs["puma"]["convert_wall_s"] = conv.summary["wall_s"]
    if fits.plm.prefix_cache is not None:  # this process's: the target's (Ray Train workers hold their own)
        run.log(f"target {fits.plm.prefix_cache.stats.describe()}")
    results = {**fits.methods, **base.methods}
    return migration_report(
        run.cfg, task=src.task, sources=[vars(b.identity) for b in src.backbones],
        target=vars(fits.target.identity), budget=sel.budget, users=src.users, chosen=sel.chosen,
        valid_idx=sel.valid_idx, methods=ev.methods, reference=ev.reference, costs=costs, metric=src.metric,
        target_path=conv.target_store, adapter_path=conv.choice["adapter"], conversion=conv.summary,
        source_reports=src.reports, fits={k: v.result for k, v in results.items()}, data=src.data,
        wall_s=time.perf_counter() - run.started, gate=checked.summary, adapter_choice=conv.choice,
        stages=dict(run.stages), **ex.report_fields())


FIT_ENGINE = ("engine.kind", "engine.num_workers", "engine.zero_stage", "engine.precision", "engine.optimizer",
              "engine.driver")  # what changes a fit's numbers (not where its cluster is, nor its actor counts)
BEFORE_FIT = ("sources", "selection_statistics", "selection")  # a baseline fit reads `fit` for the target only
STAGES: list[Stage] = [
    Stage("sources", sources),
    Stage("selection_statistics", selection_statistics, ("sources",), ("selection", "sources"),
          records.save_statistics, records.restore_statistics, full_for=("selection",)),
    Stage("selection", selection, ("sources", "selection_statistics"), ("selection",),
          records.save_selection, records.restore_selection),
    Stage("fit", fit, ("sources", "selection_statistics", "selection"),
          ("target", "adapter", "fit", "adapter_path", "template", *FIT_ENGINE), records.save_fit, records.restore_fit),
    Stage("linear", linear, ("sources", "selection_statistics", "selection", "fit"),
          ("baselines.linear", "baselines.fits_on", "target", "fit", *FIT_ENGINE), records.save_linear,
          records.restore_linear, skipped=lambda run: None, depends=BEFORE_FIT),
    Stage("random_init", random_init, ("sources", "selection_statistics", "selection", "fit"),
          ("baselines.random_init", "baselines.fits_on", "target", "fit", *FIT_ENGINE), records.save_random_init,
          functools.partial(records.restore_random_init, prompts_fn=random_target_prompts), skipped=lambda run: None,
          depends=BEFORE_FIT),
    Stage("full_retrain", full_retrain, ("sources", "fit"),
          ("baselines.full_retrain", "baselines.full_retrain_train", "target", "template", "store", *FIT_ENGINE),
          records.save_full_retrain, records.restore_full_retrain, skipped=lambda run: None, depends=("sources",)),
    Stage("candidates", candidates, ("sources", "selection_statistics", "selection", "fit"),
          ("baselines.candidates", "baselines.fits_on", "adapter", "target", "fit", *FIT_ENGINE),
          records.save_candidates, records.restore_candidates, skipped=lambda run: {}, depends=BEFORE_FIT),
    Stage("baselines", baselines, ("linear", "random_init", "candidates", "full_retrain")),
    Stage("evaluation", evaluation, ("sources", "fit", "baselines"), ("fit.eval_batch_size", "baselines.source"),
          records.save_evaluation, records.restore_evaluation),
    Stage("conversion", conversion, ("sources", "fit", "baselines", "evaluation"),
          ("ship", "convert", "target_store", "store", "sources_missing_policy"), records.save_conversion,
          records.restore_conversion),
    Stage("gate", gate, ("sources", "fit", "conversion", "baselines"), ("gate",), records.save_gate,
          records.restore_gate, skipped=lambda run: Gate({"skipped": "--skip gate"})),
    Stage("report", report, ("sources", "selection", "fit", "baselines", "evaluation", "conversion", "gate")),
]
