"""The sweep's Ray-free part: its config, the shared context every trial reads, one trial (select → fit →
evaluate on the validation split), the Pareto front over (quality, cost) and the recommendation.

A trial's quality is the primary metric (RMSE, or AUC for CTR) of the fitted adapter on the *validation* records of
every user: the same users for every trial (so trials compare), never the test records (the final report's). Its
cost is what the migration would spend with that setting: the LLM record passes of the per-user statistics its
strategy reads, plus those of the fit (training passes + early-stopping evaluation).

The recommendation is the cheapest trial (fewest LLM record passes) whose quality is within `tolerance` (relative)
of the best trial's; it is always on the Pareto front. The Tune part (trials as Ray Tune trials, each fit a Ray
Train run) lives in recipes/sweep_on_tune.py.
"""
from __future__ import annotations

import copy
import json
import math
import numbers
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from puma_ray.config import ConfigError, TemplateConfig, from_dict
from puma_ray.data import Dataset
from puma_ray.errors import SweepError
from puma_ray.fs import absolute, write_file
from puma_ray.models.adapter import PromptAdapter, adapter_spec, parse_adapter_spec
from puma_ray.models.backbone import load_model
from puma_ray.models.heads import load_head
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.recipes.migration.config import MigrateJobConfig
from puma_ray.recipes.migration.executor import Run
from puma_ray.recipes.migration.in_process import (
    InProcess,
    fit_records,
    prompt_rms,
    source_plm,
    statistics_cost,
    user_statistics,
)
from puma_ray.recipes.migration.stages import choose_valid, new_head, sources
from puma_ray.selection.statistics import label_variance
from puma_ray.selection.strategies import NEEDS, STRATEGIES, SelectionInput, resolve_budget, select
from puma_ray.tasks import metric_direction
from puma_ray.training.cost import Cost
from puma_ray.training.evaluate import evaluate
from puma_ray.training.fit import fit_mapping, mapped_prompts
from puma_ray.training.records import RecordSet

# what a trial varies; everything else is the migrate section's. "seed" (selection + fit) repeats a setting: the
# recommendation is then made on each setting's mean over its seeds, with their spread beside it
SETTING_KEYS = ("strategy", "k", "budget", "lr", "adapter", "seed")
COST_KEY = "llm_record_passes"  # the cost objective


@dataclass
class SearchConfig:
    # "grid": every combination (tune.grid_search); "optuna": multi-objective Optuna (TPE)
    kind: Literal["grid", "optuna"] = "grid"
    # names in selection.STRATEGIES
    strategies: list[str] = field(default_factory=lambda: ["kmeans_variance", "random"])
    ks: list[int] = field(default_factory=lambda: [15])  # the paper's K
    # each a user count (>= 1) or a fraction of all users
    budgets: list[int | float] = field(default_factory=lambda: [0.1])
    # adapter learning rates (fit.lr); optuna: sampled log-uniformly between the smallest and the largest
    lrs: list[float] = field(default_factory=lambda: [0.01])
    # adapters as `kind[:hidden]`: the paper's MLP ("mlp", width 2 x max(d_s, d_t)), a width ("mlp:32"), the MLP
    # with a linear path around it ("mlp_skip"), the linear map ("linear"); one: the migrate section's adapter
    adapters: list[str] | None = None
    # selection + fit seeds per setting; [0, 1, 2]: each setting three times, recommended on its mean over them
    seeds: list[int] = field(default_factory=lambda: [0])
    num_samples: int = 1  # grid: repeats of the whole grid; optuna: the number of trials
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs hold (see recipes/sweep_on_tune.py)
    tolerance: float = 0.02  # recommended: the cheapest trial within this relative distance of the best quality
    seed: int = 0  # optuna's sampler
    cpus_per_trial: float = 1.0  # engine "local": the trial process runs the fit itself
    driver_cpus: float = 0.1  # engine "ray": the trial process only selects and evaluates; its fit is a Train run
    storage_path: str | None = None  # Tune's experiment folder; None: <output>/tune

    def __post_init__(self):
        for name in ("strategies", "ks", "budgets", "lrs", "seeds") + (("adapters",) if self.adapters else ()):
            value = getattr(self, name)
            if not isinstance(value, list) or not value:
                raise ConfigError(f"search.{name} must be a non-empty list, got {value!r}")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise ConfigError(f"search.strategies: unknown {unknown}; known: {sorted(STRATEGIES)}")
        for k in self.ks:
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ConfigError(f"search.ks: each K must be an integer >= 1, got {k!r}")
        for b in self.budgets:
            resolve_budget(b, 1_000_000)  # a count or a fraction: the same check as selection.budget
        for lr in self.lrs:
            if not isinstance(lr, numbers.Real) or isinstance(lr, bool) or not lr > 0:
                raise ConfigError(f"search.lrs: each learning rate must be a number > 0, got {lr!r}")
        for spec in self.adapters or []:
            parse_adapter_spec(spec)
        if any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in self.seeds) \
                or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"search.seeds: distinct integers >= 0, got {self.seeds!r}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ConfigError(f"search.num_samples must be an integer >= 1, got {self.num_samples!r}")
        if self.max_concurrent_trials is not None and (not isinstance(self.max_concurrent_trials, int)
                                                       or self.max_concurrent_trials < 1):
            raise ConfigError(f"search.max_concurrent_trials must be an integer >= 1 or null, "
                              f"got {self.max_concurrent_trials!r}")
        if not isinstance(self.tolerance, numbers.Real) or not 0 <= self.tolerance < 1:
            raise ConfigError(f"search.tolerance must be a fraction in [0, 1), got {self.tolerance!r}")
        if not self.cpus_per_trial > 0 or not self.driver_cpus > 0:
            raise ConfigError("search.cpus_per_trial and search.driver_cpus must be > 0")

    def grid_size(self) -> int:
        return (len(self.strategies) * len(self.ks) * len(self.budgets) * len(self.lrs)
                * len(self.adapters or [None]) * len(self.seeds))


@dataclass
class SweepJobConfig:
    migrate: dict = field(default_factory=dict)  # a jobs/migrate.py config (validated as MigrateJobConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    job: MigrateJobConfig | None = field(default=None, init=False, repr=False, compare=False)  # migrate, validated

    def __post_init__(self):
        if not isinstance(self.migrate, dict) or not self.migrate:
            raise ConfigError("migrate: the migration to sweep (a jobs/migrate.py config) is needed")
        self.job = from_dict(MigrateJobConfig, copy.deepcopy(self.migrate), "migrate")


# ---------------------------------------------------------------------------------------------- shared context
@dataclass
class SweepContext:
    """What every trial reads, computed once by the driver (shipped to trials as one object-store reference)."""
    ds: Dataset  # users without a prompt already dropped
    task: str
    metric: str
    users: np.ndarray  # the joined users, in prompt-table order
    prompts: list  # per source, (n, l, d_s)
    template: TemplateConfig
    l: int
    texts: dict
    head_state: dict
    head_cfg: dict
    source_dims: list
    scales: list
    inputs: SelectionInput  # every per-user feature any swept strategy reads
    feature_costs: dict  # feature -> Cost of computing it once
    source_stores: list  # resolved source store paths (what the recommended config points at)
    source_training: dict  # store path -> its training report, for stores trained by this sweep


def prepare_context(cfg: MigrateJobConfig, strategies: list[str], output: str, log=print,
                    variance_fn=label_variance) -> SweepContext:
    """Data, source stores (trained first when missing, as migration.run does) and the per-user features of every
    strategy in the sweep: once, before any trial."""
    src = sources(Run(cfg, output, log), InProcess())  # the migration's own first stage, in this process
    joined, (head_state, head_cfg) = src.prompts, src.head
    needs = sorted({n for s in strategies for n in NEEDS[s]})
    t0 = time.perf_counter()
    inputs, feature_costs = user_statistics(cfg.selection, needs, joined, src.records,
                                            source_plm(src, 0, cfg.sources[0].model), load_head(head_state, head_cfg),
                                            src.task, variance_fn)
    log(f"per-user features {needs or '(none)'} for {len(src.users)} users: {time.perf_counter() - t0:.1f}s")
    return SweepContext(
        ds=src.records, task=src.task, metric=src.metric, users=src.users, prompts=joined.prompts,
        template=src.template, l=src.l, texts=src.texts, head_state=head_state, head_cfg=head_cfg,
        source_dims=[b.hidden_size for b in src.backbones], scales=[prompt_rms(p) for p in joined.prompts],
        inputs=inputs, feature_costs=feature_costs, source_stores=[s.path for s in src.stores],
        source_training={p: {"methods": r["methods"], "cost": r["cost"]} for p, r in src.reports.items()})


def check_feasible(search: SearchConfig, ctx: SweepContext) -> None:
    """Settings no trial could run are config errors, found before any trial starts."""
    n = len(ctx.users)
    for b in search.budgets:
        if resolve_budget(b, n) > n:
            raise SweepError(f"search.budgets: {b} users is more than the {n} users with a prompt")
    too_big = [k for k in search.ks if k > n]
    if too_big:
        raise SweepError(f"search.ks: K={too_big[0]} clusters is impossible with {n} users")
    if not (ctx.ds.records["split"] == "valid").any():
        raise SweepError("the data has no validation records (data.valid_frac = 0): trials have nothing to score")


# ---------------------------------------------------------------------------------------------- one trial
def trial_config(cfg: MigrateJobConfig, setting: dict) -> MigrateJobConfig:
    """The migrate config a trial's setting stands for (no "adapter": the migrate section's; no "seed": its own)."""
    sel = replace(cfg.selection, strategy=setting["strategy"], k=int(setting["k"]), budget=setting["budget"])
    fit = replace(cfg.fit, lr=float(setting["lr"]))
    if setting.get("seed") is not None:
        sel, fit = replace(sel, seed=int(setting["seed"])), replace(fit, seed=int(setting["seed"]))
    adapter = cfg.adapter
    if setting.get("adapter") is not None:
        adapter = replace(adapter, **parse_adapter_spec(setting["adapter"]))
    return replace(cfg, selection=sel, fit=fit, adapter=adapter)


def run_trial(ctx: SweepContext, cfg: MigrateJobConfig, setting: dict, fit_fn=fit_mapping, log=print) -> dict:
    """select → fit (fit_fn: fit.fit_mapping or the Ray layer's Train run) → evaluate on every user's validation
    records. Returns the trial's record for the report."""
    cfg = trial_config(cfg, setting)
    sel, n_users = cfg.selection, len(ctx.users)
    budget = resolve_budget(sel.budget, n_users)
    t0 = time.perf_counter()
    chosen = select(sel.strategy, ctx.inputs, budget, sel.k, sel.seed)
    cost = statistics_cost(ctx.feature_costs, sel.strategy)
    cost.wall_s += time.perf_counter() - t0
    valid_idx, fit_idx = choose_valid(sel, n_users, chosen)
    train, valid_records = fit_records(ctx.ds, ctx.users, chosen, valid_idx)
    target = load_model(cfg.target)
    plm = PromptedLM(target, ctx.template, ctx.l, ctx.texts, cfg.target.prefix_cache_mib)
    # the adapter's initial weights: the same in a fresh or a reused trial process
    mapping = PromptAdapter(ctx.source_dims, target.hidden_size, cfg.adapter, ctx.scales, plm.embed_rms,
                            seed=cfg.fit.seed)
    result = fit_fn(plm, ctx.task, mapping, [p[fit_idx] for p in ctx.prompts], ctx.users[fit_idx], train,
                    valid_records, new_head(ctx.head_state, ctx.head_cfg, ctx.task), cfg.fit, log=log, name="puma")
    cost = cost.merge(result.cost)
    eval_cost = Cost(flops_per_token=result.cost.flops_per_token)
    valid = RecordSet.from_frame(ctx.ds.split("valid"), ctx.users)
    metrics = evaluate(plm, result.head, ctx.task, mapped_prompts(result.mapping, ctx.prompts), valid,
                       cfg.fit.eval_batch_size, eval_cost)
    setting = {**setting, "adapter": adapter_spec(cfg.adapter), "seed": cfg.selection.seed}  # what actually ran
    return {"config": setting, "quality": float(metrics[ctx.metric]), "metric": ctx.metric,
            "cost": cost.to_dict(), "valid_metrics": metrics, "users_selected": int(budget),
            "validation_users": int(len(valid_idx)), "train_records": int(len(train)),
            "best_epoch": result.best_epoch, "epochs": len(result.history), "eval_cost": eval_cost.to_dict()}


# ---------------------------------------------------------------------------------------------- Pareto + pick
def maximize(metric: str) -> bool:
    """Is a higher value of this quality metric better (AUC) or a lower one (RMSE)?"""
    return metric_direction(metric)


def _cost(trial: dict) -> float:
    return float(trial["cost"][COST_KEY])


def _loss(trial: dict, up: bool) -> float:
    """Quality as a value to minimise."""
    return -trial["quality"] if up else trial["quality"]


def dominates(a: dict, b: dict, up: bool = False) -> bool:
    """a is at least as good as b in quality and cost, and strictly better in one."""
    qa, qb, ca, cb = _loss(a, up), _loss(b, up), _cost(a), _cost(b)
    return qa <= qb and ca <= cb and (qa < qb or ca < cb)


def pareto_front(trials: list[dict], up: bool = False) -> list[int]:
    """Indices of the trials no other trial dominates, cheapest first. Trials tied on both objectives are all on
    the front (none dominates another)."""
    front = [i for i, t in enumerate(trials) if not any(dominates(o, t, up) for o in trials)]
    return sorted(front, key=lambda i: (_cost(trials[i]), _loss(trials[i], up), i))


def within_tolerance(quality: float, best: float, tolerance: float, up: bool = False) -> bool:
    margin = tolerance * abs(best)
    return quality >= best - margin if up else quality <= best + margin


def recommend(trials: list[dict], tolerance: float, up: bool = False) -> int:
    """Index of the cheapest trial within `tolerance` (relative) of the best quality; cost ties go to the better
    quality, then to the earlier trial. On the front: whatever dominated it would be as good and cheaper."""
    if not trials:
        raise SweepError("no trial finished: nothing to recommend")
    best = min(_loss(t, up) for t in trials)
    best = -best if up else best
    ok = [i for i, t in enumerate(trials) if within_tolerance(t["quality"], best, tolerance, up)]
    return min(ok, key=lambda i: (_cost(trials[i]), _loss(trials[i], up), i))


# the reference rows (training/reference.py), in the order and words the sweep prints them
REFERENCE_NAMES = {"global_mean": "global mean", "user_mean": "per-user mean", "bias": "user + item bias"}


def versus_reference(quality: float, metric: str, reference: dict) -> dict:
    """Each reference row's value of the trials' metric, and whether `quality` is strictly better than it."""
    up = maximize(metric)
    out = {}
    for name, m in reference.items():
        if metric in m:
            value = float(m[metric])
            out[name] = {metric: value, "beaten": bool(quality > value if up else quality < value)}
    return out


def reference_summary(report: dict) -> str:
    """One line: the reference rows on the validation records the trials are scored on, and whether the
    recommended trial beats the per-user mean (the weakest system that personalizes at all) and the user + item
    bias (the strongest). Empty without them."""
    vs = report.get("recommended_vs_reference")
    if not vs:
        return ""
    metric = report["metric"]
    rows = ", ".join(f"{REFERENCE_NAMES.get(n, n)} {v[metric]:.4f}" for n, v in vs.items())
    line = f"reference rows (no LLM, fitted on the train split) on the same validation records: {rows}"
    if "user_mean" in vs:
        q, um = report["recommended"]["quality"], vs["user_mean"][metric]
        line += (f"; the recommended trial ({q:.4f}) beats the per-user mean" if vs["user_mean"]["beaten"]
                 else f"; the recommended trial ({q:.4f}) does NOT beat the per-user mean ({um:.4f})")
    if "bias" in vs:  # the strongest reference: an LLM system that personalizes well beats it too
        line += ("; it beats the user + item bias" if vs["bias"]["beaten"]
                 else f"; it does not beat the user + item bias ({vs['bias'][metric]:.4f})")
    return line


def _numeric_mean(dicts: list[dict]) -> dict:
    keys = [k for k, v in dicts[0].items() if isinstance(v, numbers.Real) and not isinstance(v, bool)]
    return {k: float(np.mean([d[k] for d in dicts if k in d])) for k in keys}


def over_seeds(trials: list[dict]) -> list[dict]:
    """Settings: the trials grouped by their config without "seed", each with the mean quality, cost and validation
    metrics over its seeds, the spread (`quality_sd`, sample sd), `seeds` and `per_seed`. Trials that share no
    setting are returned as they are (one seed each: a setting is its trial)."""
    groups: dict[str, list[dict]] = {}
    for i, t in enumerate(trials):
        # a trial that names no seed (a report from before seeds, a hand-made list) is a setting of its own
        key = (json.dumps({k: v for k, v in t["config"].items() if k != "seed"}, sort_keys=True, default=str)
               if "seed" in t["config"] else f"#{i}")
        groups.setdefault(key, []).append(t)
    if all(len(g) == 1 for g in groups.values()):
        return trials
    settings = []
    for g in groups.values():
        q = [t["quality"] for t in g]
        settings.append({
            "config": {k: v for k, v in g[0]["config"].items() if k != "seed"}, "metric": g[0]["metric"],
            "quality": float(np.mean(q)), "quality_sd": float(np.std(q, ddof=1)) if len(q) > 1 else 0.0,
            "seeds": [t["config"].get("seed") for t in g], "per_seed": q,
            "cost": _numeric_mean([t["cost"] for t in g]),
            "valid_metrics": _numeric_mean([t.get("valid_metrics", {}) for t in g]),
            "users_selected": g[0].get("users_selected")})
    return settings


def build_report(trials: list[dict], tolerance: float, failed: list[dict] | None = None, **extra) -> dict:
    """report.json of a sweep: every finished trial; "pareto" (trial dicts, cheapest first) and "pareto_indices";
    "recommended" (a trial dict) and its index; "best" the best-quality trial's index. Trials whose quality is not
    a finite number count as failed. With `reference=` (the LLM-free rows on the trials' validation records),
    "recommended_vs_reference": each row's value and whether the recommended trial beats it."""
    failed = list(failed or [])
    done = []
    for t in trials:
        if isinstance(t.get("quality"), numbers.Real) and math.isfinite(t["quality"]):
            done.append(t)
        else:
            failed.append({**t, "error": t.get("error") or f"quality {t.get('quality')!r} is not a finite number"})
    if not done:
        raise SweepError(f"every trial failed ({len(failed)}): "
                         + "; ".join(f"{f.get('config')}: {f.get('error')}" for f in failed[:3]))
    metric = done[0]["metric"]
    up = maximize(metric)
    # with several seeds a setting is its mean over them: the front and the pick are over settings, not draws
    settings = over_seeds(done)
    front = pareto_front(settings, up)
    rec = recommend(settings, tolerance, up)
    best = min(range(len(settings)), key=lambda i: (_loss(settings[i], up), _cost(settings[i]), i))
    report = {"metric": metric, "maximize": up, "cost_key": COST_KEY, "tolerance": tolerance, "trials": done,
              "settings": settings, "pareto": [settings[i] for i in front], "pareto_indices": front,
              "recommended": settings[rec], "recommended_index": rec, "best_index": best, "failed": failed, **extra}
    if extra.get("reference"):
        report["recommended_vs_reference"] = versus_reference(settings[rec]["quality"], metric, extra["reference"])
    return report


# ---------------------------------------------------------------------------------------------- the result
def recommended_migrate_config(migrate: dict, setting: dict, source_stores: list[str]) -> dict:
    """The sweep's migrate section with the recommended setting in place, and the source store paths pinned to
    the stores the sweep used (trained once: a migrate run elsewhere reuses them instead of training again)."""
    out = copy.deepcopy(migrate)
    out.setdefault("selection", {}).update(strategy=setting["strategy"], k=int(setting["k"]), budget=setting["budget"])
    out.setdefault("fit", {})["lr"] = float(setting["lr"])
    if setting.get("adapter") is not None:
        out["adapter"] = {**out.get("adapter", {}), **parse_adapter_spec(setting["adapter"])}
    for src, path in zip(out["sources"], source_stores):
        src["store"] = absolute(path)
    return out


def recommended_header(report: dict, path: str) -> str:
    rec = report["recommended"]
    c = rec["config"]
    return (f"# python jobs/migrate.py --config {path}\n"
            f"# Recommended by a sweep: strategy {c['strategy']}, K={c['k']}, budget {c['budget']}, lr {c['lr']}"
            + (f", adapter {c['adapter']}" if c.get("adapter") else "")
            + f": validation {report['metric']} {rec['quality']:.4f}"
            + (f" ± {rec['quality_sd']:.4f} over seeds {rec['seeds']}" if len(rec.get("seeds") or []) > 1 else "")
            + f" at {int(_cost(rec)):,} LLM record passes (the cheapest of {len(report['trials'])} trials within "
            f"{report['tolerance']:.1%} of the best).\n"
            + (f"# {reference_summary(report)}.\n" if report.get("recommended_vs_reference") else ""))


def write_outputs(report: dict, migrate: dict, output: str, storage=None, log=print) -> dict:
    """report.json, recommended.yaml (a config jobs/migrate.py --config accepts) and report.md into `output`."""
    import yaml

    from puma_ray.fs import filesystem, join
    from puma_ray.recipes.runs import report_path, write_report
    config = recommended_migrate_config(migrate, report["recommended"]["config"], report["source_stores"])
    report["recommended_config"] = config
    paths = {"report": report_path(output), "recommended": join(output, "recommended.yaml")}
    write_report(paths["report"], "sweep", report, storage)
    fs, inner = filesystem(paths["recommended"], storage)
    write_file(fs, inner, (recommended_header(report, paths["recommended"])
                           + yaml.safe_dump(config, sort_keys=False)).encode())
    try:
        from puma_ray.reports.markdown import write_sweep_report
    except ImportError as e:  # written by another part of the project; the sweep's results stand without it
        log(f"note: report.md skipped ({e})")
    else:
        paths["markdown"] = write_sweep_report(report, output, storage)
    return paths
