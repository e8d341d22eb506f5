"""The paper's experiments, reproduced from one config: Tables 2-4 and Figures 3-6 (`jobs/benchmark.py`).

Every experiment is a set of migrations (`migration.run`) that share what they can:
- each model family's store is trained once (Eq. 1) under `{stores}/<family>`; it is the source system when the
  family is a source, and "retrained from scratch on that model" when it is a target (the same training, the same
  data, the same schedule as full retraining);
- migrations are memoised by their full config: Table 4's PUMA row is Table 2's PUMA run, Figure 4's llama → qwen2
  cell is that run again, and so on; each lies under `<output>/runs/<name>/` with its report.json and report.md,
  and a rerun of the benchmark reuses every finished run whose config is unchanged (resume after a crash; the
  keys and which finished run answers to one: `recipes/run_memo.py`).

Writes `benchmark.json` (every table and figure's numbers, the machine, the wall time) and `benchmark.md` (the tables
and the PNGs) into the output folder. Core module: no Ray import; the job passes the Ray fit in when the config's
engine asks for it.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from puma_ray.artifacts.formats import sha256_hex
from puma_ray.artifacts.store import MANIFEST, PromptStore
from puma_ray.config import ConfigError, ModelConfig, PromptTrainConfig, from_dict, to_dict
from puma_ray.data import load_dataset
from puma_ray.fs import filesystem, join
from puma_ray.recipes.migration import MigrateJobConfig
from puma_ray.recipes.migration import run as run_migration
from puma_ray.recipes.run_memo import read_finished, run_key
from puma_ray.recipes.runs import provenance, write_report
from puma_ray.recipes.train_prompts import TrainPromptsJobConfig, train_store
from puma_ray.reports.markdown import (
    write_migration_report,
)
from puma_ray.selection.strategies import NEEDS, STRATEGIES, quantile_bins, resolve_budget, select
from puma_ray.tasks import get_task
from puma_ray.training.reference import reference_metrics

# The paper's names for the selection strategies (Table 4)
STRATEGY_LABELS = {
    "random": "Random", "variance_bucketing": "Variance Bucketing", "loss_bucketing": "Loss Bucketing",
    "kmeans_stratified": "K-Means Stratified", "kmeans_pca": "K-Means with PCA", "kmeans_fps": "K-Means + FPS",
    "kmeans_loss": "K-Means + Loss Stratification", "kmeans_variance": "K-Means + Variance Stratification (PUMA)",
    "ffn_kmeans": "K-Means (on FFN Activ.)", "ffn_kmeans_loss": "K-Means (on FFN Activ.) + Loss Stratification",
    "ffn_kmeans_variance": "K-Means (on FFN Activ.) + Variance Stratification",
}
# Runs besides Table 2's own evaluate PUMA only (plus the source, one cheap pass over the test records): the
# other baselines would triple each run and no table reads them
PUMA_ONLY = {"source": True, "random_init": False, "linear": False, "full_retrain": False}


@dataclass
class ExperimentsConfig:
    """Which experiments run; a null/empty entry skips that experiment."""
    main: bool = True  # Table 2 + 3: source → target with every baseline and full retraining
    # Table 2 in the paper's protocol: its caption says PUMA "was trained using data from the entire user
    # population", so the adapter is fitted on every user (once per seed, PUMA and the source only), beside full
    # retraining and the budget run. No user is left to hold out: early stopping reads every user's valid records
    # (choose_valid's rule when the budget takes everyone; disjoint from the train and test records)
    table2_all_users: bool = False
    strategies: list[str] | str | None = "all"  # Table 4: these strategies ("all": every registered one) at one budget
    random_multiple: float | None = 3.0  # Table 4's extra row: random selection at this multiple of the budget
    random_budgets: list[int | float] | None = None  # Figure 3: random selection at these budgets (counts or fractions)
    cross_family: list[str] | None = None  # Figure 4: every ordered pair of these families (>= 3 in the paper's spirit)
    chain: list[str] | None = None  # Figure 5: families in chain order; each step's source = the previous target store
    aggregation: dict | None = None  # Figure 6: {"sources": [a, b], "target": c}
    # Tables 2 and 4 and Figures 4-6 once per seed (selection + adapter fit); rows and cells report mean ± sd. The
    # stores (source system, full retraining) are trained once: their seed is prepare.seed, their rows say n = 1
    seeds: list[int] = field(default_factory=lambda: [0])
    shared_prompt: bool = False  # per family, one prompt for all users trained like the store: is it the prompts?

    def __post_init__(self):
        if isinstance(self.strategies, str) and self.strategies != "all":
            raise ConfigError("experiments.strategies must be a list of strategy names or 'all'")
        for name in ([] if self.strategies in (None, "all") else self.strategies):
            if name not in STRATEGIES:
                raise ConfigError(f"experiments.strategies: unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
        if not self.seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in self.seeds) \
                or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"experiments.seeds must be distinct integers, got {self.seeds!r}")
        if self.chain is not None and len(self.chain) < 2:
            raise ConfigError("experiments.chain needs at least two families (one migration)")
        if self.aggregation is not None:
            if set(self.aggregation) != {"sources", "target"} or len(self.aggregation["sources"]) < 2:
                raise ConfigError("experiments.aggregation must be {sources: [a, b, ...], target: c}")

    def families_used(self, source: str, target: str) -> set[str]:
        used = {source, target, *(self.cross_family or []), *(self.chain or [])}
        if self.aggregation:
            used |= {*self.aggregation["sources"], self.aggregation["target"]}
        return used


@dataclass
class BenchmarkJobConfig:
    families: dict[str, ModelConfig] = field(default_factory=dict)  # label → model
    source: str = "llama"  # family label of the main migration's source (Tables 2-4, Figure 3)
    target: str = "qwen2"  # family label of the main migration's target (a key of `families`)
    prepare: PromptTrainConfig = field(default_factory=PromptTrainConfig)  # every family's store; = full retraining
    migrate: dict = field(default_factory=dict)  # a migrate config without sources/target: data, selection, fit, ...
    experiments: ExperimentsConfig = field(default_factory=ExperimentsConfig)
    stores: str = "{output}/stores"  # family stores: {stores}/<family>; point at an earlier run's to reuse them

    def __post_init__(self):
        if not self.families:
            raise ConfigError("families: name at least the source and the target model")
        unknown = self.experiments.families_used(self.source, self.target) - set(self.families)
        if unknown:
            raise ConfigError(f"families {sorted(unknown)} are used by the experiments but not defined under families")
        for key in ("sources", "target"):
            if key in self.migrate:
                raise ConfigError(f"migrate.{key}: the benchmark sets it per experiment; name models under families")
        self.migrate_config("check", [("check", self.source)], self.source)  # validates the migrate section now

    def migrate_config(self, name: str, sources: list[tuple[str, str]], target: str, **sections) -> MigrateJobConfig:
        """The migrate config of one run: the `migrate` section, these (store path, family) sources and target,
        and per-run section overrides (selection, baselines)."""
        body = copy.deepcopy(self.migrate)
        body["sources"] = [{"store": store, "model": to_dict(self.families[fam])} for store, fam in sources]
        body["target"] = to_dict(self.families[target])
        for key, value in sections.items():
            body[key] = {**body.get(key, {}), **value}
        if body.get("baselines", {}).get("full_retrain"):
            body["baselines"].setdefault("full_retrain_train", to_dict(self.prepare))
        return from_dict(MigrateJobConfig, body, f"benchmark run {name}")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample sd of one figure's or metric's per-seed values (sd 0.0 for a single seed)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def over_seeds(runs: list[dict]) -> tuple[dict, dict, int]:
    """(mean, sample sd, n) of each metric over one row's runs; sd is 0.0 for a single run (said by n = 1)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    stats = {k: _mean_sd([r[k] for r in runs]) for k in keys}
    mean, sd = {k: m for k, (m, _) in stats.items()}, {k: s for k, (_, s) in stats.items()}
    if "records" in runs[0]:
        mean["records"] = runs[0]["records"]
    return mean, sd, len(runs)


def _rows_over_seeds(per_seed: dict) -> tuple[dict, dict, dict]:
    """Each method's (mean, sd, n) over the seeds' runs that have it."""
    names = list(dict.fromkeys(name for methods in per_seed.values() for name in methods))
    mean, spread, n = {}, {}, {}
    for name in names:
        mean[name], spread[name], n[name] = over_seeds([m[name] for m in per_seed.values() if name in m])
    return mean, spread, n


def shipped_row(report: dict) -> dict:
    """What one migration shipped (`ship` chooses by the validation users' records; test never enters) with its
    validation scores and every candidate's test figure, for the table beside Table 2."""
    choice = report.get("adapter_choice") or {"shipped": "puma", "rule": "puma", "validation": {}}
    metric = report["primary_metric"]
    return {"adapter": choice["shipped"], "rule": choice.get("rule"), "metric": metric,
            "validation": choice.get("validation", {}),
            "test": {n: report["methods"][n][metric] for n in choice.get("validation", {}) if n in report["methods"]}}


def _gain(migrated: float, retrained: float, lower_is_better: bool) -> float:
    """Figure 4's gain: > 1 when the migrated prompts beat retraining on the target."""
    return retrained / migrated if lower_is_better else migrated / retrained


def _seed_tag(seed: int | None, base: MigrateJobConfig) -> str:
    return "" if seed is None or seed == base.selection.seed else f"-s{seed}"


def _seed_sections(seed: int | None, base: MigrateJobConfig, selection: dict) -> dict:
    """Per-run config sections for `seed`: the selection's and the adapter fit's seed (nothing when it is the base's
    own, so seed-0 runs keep their names and memo keys)."""
    if seed is None or seed == base.selection.seed:
        return {"selection": selection}
    return {"selection": {**selection, "seed": seed}, "fit": {"seed": seed}}


def machine() -> dict:
    """What the figures were measured on (the docs quote it)."""
    import torch
    return {"cpus": len(os.sched_getaffinity(0)), "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def _budget_times(budget: float, factor: float) -> float:
    return round(budget * factor, 6) if budget < 1 else int(round(budget * factor))  # 0.1 * 3 must be 0.3


class Benchmark:
    """Runs the experiments of one config into `output`; `engine(cfg, run_dir)` gives the migration's executor
    (None: in this process)."""

    def __init__(self, cfg: BenchmarkJobConfig, output: str, log=print, engine: Callable = lambda c, o: None):
        output = output.rstrip("/") or output  # `runs/b/` and `runs/b` name the same runs and stores
        self.cfg, self.output, self.log, self.engine = cfg, output, log, engine
        self.base = cfg.migrate_config("base", [("base", cfg.source)], cfg.source)
        self.stores_dir = cfg.stores.format(output=output)
        self.stores: dict[str, dict] = {}  # family → {"path", "methods", "cost"}
        self.runs: dict[str, dict] = {}  # run name → report
        self.keys: dict[str, str] = {}  # a run's config (as JSON) → its name: identical runs happen once
        self._dataset = None
        self._inputs = None  # the source store's selection features (spectrum), read once

    # ---- family stores ----------------------------------------------------------------------------------------
    def store(self, family: str) -> dict:
        """The family's trained store: trained now when missing, else read (its test metrics from the report
        saved beside it, or from the store's own provenance)."""
        if family in self.stores:
            return self.stores[family]
        self.resolve(family)
        path = join(self.stores_dir, family)
        report_file = join(self.stores_dir, f"{family}.report.json")
        fs, root = filesystem(path, self.base.storage)
        if fs.exists(join(root, MANIFEST)):
            self._check_prepare(path, family)
        else:
            self.log(f"[store {family}] training every user's prompt on {self.cfg.families[family].name}")
            job = TrainPromptsJobConfig(model=self.cfg.families[family], data=self.base.data,
                                        template=self.base.template, train=self.cfg.prepare, store=self.base.store,
                                        storage=self.base.storage)
            report, _ = train_store(job, self.dataset(), path, log=lambda m: self.log("  " + m))
            write_report(report_file, "train_prompts", report, self.base.storage)
        rfs, rroot = filesystem(report_file, self.base.storage)
        if rfs.exists(rroot):
            with rfs.open(rroot) as f:
                report = json.load(f)
            entry = {"methods": report["methods"]["store"], "cost": report["cost"]["train_prompts"],
                     "init_correlation": report.get("training", {}).get("init_correlation"),
                     "init_scale": self.cfg.prepare.init_scale,
                     "reference": {k: v for k, v in report["methods"].items() if k != "store"}}
        else:  # a store made elsewhere: its manifest still says how it tested
            entry = {"methods": PromptStore.open(path, self.base.storage).manifest.provenance.get("test", {}),
                     "cost": {}}
        self.stores[family] = {"path": path, "model": self.cfg.families[family].name, **entry}
        return self.stores[family]

    def _check_prepare(self, path: str, family: str) -> None:
        """A store reused from an earlier run must have been trained with this config's `prepare` (Eq. 1's
        schedule, init scale, seed): the store is both the source system and full retraining, so a changed
        `prepare` silently reusing the old store would mislabel every row. Stores made elsewhere (no training
        config in their provenance) are taken as they are."""
        config = PromptStore.open(path, self.base.storage).manifest.provenance.get("config") or {}
        trained = config.get("train")
        if trained is None:
            return
        wanted = to_dict(self.cfg.prepare)
        diff = sorted(k for k in set(wanted) | set(trained) if wanted.get(k) != trained.get(k))
        if diff:
            raise ConfigError(f"store {path} ({family}) was trained with other prepare settings ({', '.join(diff)}: "
                              f"{ {k: trained.get(k) for k in diff} } there, { {k: wanted.get(k) for k in diff} } "
                              "now); point `stores` at a new folder or remove it")

    def shared_store(self, family: str) -> dict:
        """The control of `experiments.shared_prompt`: one prompt for every user on `family`, trained like its store
        (same schedule, data and seed); tested like it. Listed as `<family>/shared` beside the stores."""
        key = f"{family}/shared"
        if key in self.stores:
            return self.stores[key]
        self.resolve(family)
        path = join(self.stores_dir, f"{family}-shared")
        report_file = join(self.stores_dir, f"{family}-shared.report.json")
        rfs, rroot = filesystem(report_file, self.base.storage)
        if not rfs.exists(rroot):
            self.log(f"[store {key}] one shared prompt for every user on {self.cfg.families[family].name}")
            job = TrainPromptsJobConfig(model=self.cfg.families[family], data=self.base.data,
                                        template=self.base.template, train=replace(self.cfg.prepare, shared=True),
                                        store=replace(self.base.store, overwrite=True), storage=self.base.storage)
            report, _ = train_store(job, self.dataset(), path, log=lambda m: self.log("  " + m))
            write_report(report_file, "train_prompts", report, self.base.storage)
        with rfs.open(rroot) as f:
            report = json.load(f)
        self.stores[key] = {"path": path, "model": self.cfg.families[family].name,
                            "methods": report["methods"]["store"], "cost": report["cost"]["train_prompts"]}
        return self.stores[key]

    def resolve(self, *families: str) -> None:
        """foundation:<family> models → their pretrained folders (pretrained now when not cached), before the
        family's first store or run: every run and store then names the same frozen weights. Families are pretrained
        when first needed, so Table 2 does not wait for the figures' families."""
        from puma_ray.recipes.foundation import resolve_model
        for family in families:
            self.cfg.families[family] = resolve_model(self.cfg.families[family], self.dataset(), self.base.template,
                                                      lambda m: self.log("  " + m))

    def dataset(self):
        if self._dataset is None:
            self._dataset = load_dataset(self.base.data, self.base.storage)
        return self._dataset

    # ---- migrations -------------------------------------------------------------------------------------------
    def migrate(self, name: str, sources: list[tuple[str, str]], target: str, **sections) -> dict:
        """One migration, memoised by config: in this benchmark, and on disk across reruns of it."""
        self.resolve(target, *(family for _, family in sources))
        cfg = self.cfg.migrate_config(name, sources, target, **sections)
        key = run_key(to_dict(cfg), self.output)
        if key in self.keys:
            return self.runs[self.keys[key]]
        run_dir = join(self.output, "runs", name)
        report = read_finished(run_dir, key, self.output, self.base.storage)
        if report is None:
            self.log(f"[run {name}] {' + '.join(f for _, f in sources)} → {target}")
            report = run_migration(cfg, run_dir, log=lambda m: self.log("  " + m), executor=self.engine(cfg, run_dir))
            report.update(benchmark_key=key, benchmark_run=name)
            write_report(join(run_dir, "report.json"), "migrate", report, cfg.storage)
            write_migration_report(report, run_dir, cfg.storage)
            metric = report["primary_metric"]
            self.log(f"[run {name}] PUMA {metric} {report['methods']['puma'][metric]:.4f} in {report['wall_s']:.0f}s")
        self.runs[name], self.keys[key] = report, name
        return report

    def puma(self, source: str, target: str, strategy: str | None = None, budget: float | None = None,
             store: str | None = None, tag: str = "", seed: int | None = None) -> dict:
        """PUMA (or another selection) from one family's store (or `store`, made on that family) to a target;
        `seed` (selection + fit) other than the config's own runs under a `-s<seed>` name."""
        sel = self.base.selection
        strategy, budget = strategy or sel.strategy, sel.budget if budget is None else budget
        path = store or self.store(source)["path"]
        name = f"{tag}{source}-to-{target}-{strategy}-b{budget:g}{_seed_tag(seed, self.base)}"
        return self.migrate(name, [(path, source)], target, baselines=PUMA_ONLY,
                            **_seed_sections(seed, self.base, {"strategy": strategy, "budget": budget}))

    # ---- experiments ------------------------------------------------------------------------------------------
    def table2(self) -> dict:
        """Table 2 + 3: the main migration with every baseline, once per seed (full retraining with the first seed
        only: it does not depend on the selection/fit seed)."""
        c = self.cfg
        self.store(c.target)  # trained first so the Figure 4/5 references never retrain it inside a run
        per_seed, shipped, first = {}, {}, None
        for seed in c.experiments.seeds:
            report = self.main_run(seed)
            per_seed[seed], shipped[seed] = dict(report["methods"]), shipped_row(report)
            if shipped[seed]["adapter"] in report["methods"]:  # the shipped adapter's own test row, per seed
                per_seed[seed]["shipped"] = report["methods"][shipped[seed]["adapter"]]
            first = first or report
        mean, spread, n = _rows_over_seeds(per_seed)
        return {"run": first["benchmark_run"], "task": first["task"], "methods": mean, "spread": spread, "n": n,
                "seeds": list(per_seed), "per_seed": per_seed, "shipped": shipped,
                "reference": first.get("reference", {}), "cost": first["cost"],
                "cost_ratio_full_retrain_over_puma": first.get("cost_ratio_full_retrain_over_puma"),
                "selection": first["selection"]}

    def main_run(self, seed: int) -> dict:
        """Table 2's migration at one seed, with every baseline (full retraining with the first seed only: it does
        not depend on the selection/fit seed); memoised like every run."""
        c, sel = self.cfg, self.base.selection
        first = seed == c.experiments.seeds[0]
        baselines = {"source": True, "random_init": True, "linear": True, "full_retrain": first}
        sections = _seed_sections(seed, self.base, {"strategy": sel.strategy, "budget": sel.budget})
        report = self.migrate(f"main-{c.source}-to-{c.target}{_seed_tag(seed, self.base)}",
                              [(self.store(c.source)["path"], c.source)], c.target, baselines=baselines, **sections)
        # Table 4 / Figures 3-6 ask for PUMA at the base budget without the other baselines: the same PUMA fit
        # (it runs first, from the same seeds), so they read it from the main run instead of fitting it again
        alias = self.cfg.migrate_config("alias", [(self.store(c.source)["path"], c.source)], c.target,
                                        baselines=PUMA_ONLY, **sections)
        self.keys[run_key(to_dict(alias), self.output)] = report["benchmark_run"]
        return report

    def table2_all_users(self) -> dict:
        """Table 2 in the paper's protocol: PUMA fitted on every user (budget = all users; selection is moot, so
        "random"), once per seed, beside full retraining (the target's store) and the budget run's PUMA (Table 2's
        own runs, same seeds). Early stopping reads every user's valid records: no user is left to hold out."""
        c, sel = self.cfg, self.base.selection
        users = len(self.dataset().users)
        per_seed, shipped, first = {}, {}, None
        for seed in c.experiments.seeds:
            sections = _seed_sections(seed, self.base, {"strategy": "random", "budget": users})
            report = self.migrate(f"all-users-{c.source}-to-{c.target}{_seed_tag(seed, self.base)}",
                                  [(self.store(c.source)["path"], c.source)], c.target, baselines=PUMA_ONLY,
                                  **sections)
            methods = report["methods"]
            per_seed[seed] = {"puma_all_users": methods["puma"], **{k: v for k, v in methods.items() if k != "puma"}}
            shipped[seed] = shipped_row(report)
            first = first or report
        mean, spread, n = _rows_over_seeds(per_seed)
        # the budget row: Table 2's own runs (read from disk when another process of this benchmark ran them)
        budget = [self.main_run(seed)["methods"]["puma"] for seed in c.experiments.seeds]
        mean["puma_budget"], sd_budget, n["puma_budget"] = over_seeds(budget)
        spread["puma_budget"] = sd_budget
        mean["full_retrain"], spread["full_retrain"], n["full_retrain"] = self.store(c.target)["methods"], {}, 1
        return {"run": first["benchmark_run"], "users": users, "budget_users": resolve_budget(sel.budget, users),
                "validation_users": first["selection"]["validation_users"], "methods": mean, "spread": spread,
                "n": n, "seeds": list(per_seed), "per_seed": per_seed, "shipped": shipped,
                "reference": first.get("reference", {}), "cost": first["cost"],
                "cost_full_retrain": self.store(c.target)["cost"]}

    def table4(self) -> list[dict]:
        c, ex, budget = self.cfg, self.cfg.experiments, self.base.selection.budget
        names = list(STRATEGIES) if ex.strategies == "all" else ex.strategies

        def row(label: str, strategy: str, b: float) -> dict:
            reports = [self.puma(c.source, c.target, strategy, b, seed=seed) for seed in ex.seeds]
            return {**self._row(label, strategy, b, reports), **self.spectrum(strategy, b, ex.seeds, reports)}

        rows = [row(STRATEGY_LABELS.get(s, s), s, budget) for s in names]
        if ex.random_multiple:
            big = _budget_times(budget, ex.random_multiple)
            rows.insert(0, row(f"Random ({ex.random_multiple:g}x budget)", "random", big))
        return rows

    def spectrum(self, strategy: str, budget: float, seeds: list[int], reports: list[dict]) -> dict:
        """The chosen users per quintile of training-label variance (quintile 1: the lowest), per seed, and the
        variance spread (sd) of the chosen users: does a selection span the whole spectrum, as the paper says its
        rule does? Recomputed here from the source store exactly as the migration selects, for the strategies that
        read only the prompts and the variance (the others need LLM passes); `matches_run` says each seed's
        recomputed set hashes to the set its run fitted on (the run reports only the hash)."""
        if not set(NEEDS[strategy]) <= {"variance"}:
            return {}
        inputs = self._selection_inputs()
        quintile = quantile_bins(inputs.variance, 5)
        n = len(inputs)
        counts, spread, matches = [], [], []
        for seed, report in zip(seeds, reports):
            chosen = select(strategy, inputs, resolve_budget(budget, n), self.base.selection.k, seed)
            counts.append(np.bincount(quintile[chosen], minlength=5).tolist())
            spread.append(float(np.std(inputs.variance[chosen])))
            digest = sha256_hex("\n".join(map(str, inputs.user_ids[chosen])).encode())
            matches.append(digest == report["selection"].get("selected_sha256"))
        return {"quintiles": counts, "variance_sd": spread, "matches_run": matches,
                "variance_sd_all_users": float(np.std(inputs.variance))}

    def _selection_inputs(self):
        """The source store's per-user selection features (prompts + label variance), as the migration computes
        them (user_statistics), once."""
        if self._inputs is None:
            from puma_ray.conversion.run import join_sources
            from puma_ray.recipes.migration.in_process import user_statistics
            store = PromptStore.open(self.store(self.cfg.source)["path"], self.base.storage)
            joined = join_sources([store], self.base.sources_missing_policy, self.base.convert.max_prompt_scale)
            self._inputs, _ = user_statistics(self.base.selection, ("variance",), joined, self.dataset(), None, None,
                                              self.dataset().task)
        return self._inputs

    @staticmethod
    def _row(label: str, strategy: str, budget: float, reports: list[dict]) -> dict:
        """One strategy's row over the seeds' runs: metrics as mean, with sd and n beside them."""
        mean, sd, n = over_seeds([r["methods"]["puma"] for r in reports])
        first = reports[0]
        return {"label": label, "strategy": strategy, "budget": budget,
                "users": first["selection"]["users_selected"], "metrics": mean, "spread": sd, "n": n,
                "per_seed": [r["methods"]["puma"] for r in reports],
                "llm_record_passes": first["cost"]["puma"]["llm_record_passes"],
                "wall_s": round(float(np.mean([r["cost"]["puma"]["wall_s"] for r in reports])), 2)}

    def figure3(self) -> dict:
        c = self.cfg
        metric = self.metric()
        points = []
        for b in self.cfg.experiments.random_budgets:
            r = self.puma(c.source, c.target, "random", b)
            points.append({"budget": b, "users": r["selection"]["users_selected"],
                           "value": r["methods"]["puma"][metric],
                           "llm_record_passes": r["cost"]["puma"]["llm_record_passes"]})
        main = self.puma(c.source, c.target)
        return {"metric": metric, "random": points,
                "puma": {"users": main["selection"]["users_selected"], "value": main["methods"]["puma"][metric]},
                "retrained": self.store(c.target)["methods"].get(metric)}

    def figure4(self) -> dict:
        """gain = retrained / migrated for lower-is-better metrics (migrated / retrained otherwise): > 1 means the
        migrated prompts beat retraining every prompt on the target, as the paper's Figure 4. Each cell is the mean
        over the config's seeds (selection + fit); the gain's sd is over the per-seed gains."""
        metric, fams, seeds = self.metric(), self.cfg.experiments.cross_family, self.cfg.experiments.seeds
        lower = metric in ("rmse", "mae")
        cells = []
        for s in fams:
            for t in fams:
                if s == t:
                    continue
                per_seed = [self.puma(s, t, seed=seed)["methods"]["puma"][metric] for seed in seeds]
                retrained = self.store(t)["methods"][metric]
                migrated, sd = _mean_sd(per_seed)
                gain, (_, gain_sd) = _gain(migrated, retrained, lower), _mean_sd(
                    [_gain(m, retrained, lower) for m in per_seed])
                cells.append({"source": s, "target": t, "migrated": migrated, "migrated_sd": sd,
                              "per_seed": per_seed, "retrained": retrained,
                              "source_on_source": self.store(s)["methods"][metric], "gain": gain, "gain_sd": gain_sd})
        return {"metric": metric, "families": fams, "cells": cells, "seeds": seeds}

    def figure5(self) -> dict:
        """The chain once per seed (each seed's step i starts from that seed's step i-1 store); each step's
        figure is the mean over the seeds, its store and run those of the first seed."""
        metric, chain, seeds = self.metric(), self.cfg.experiments.chain, self.cfg.experiments.seeds
        chains = [self._chain(seed) for seed in seeds]
        steps = []
        for i, first in enumerate(chains[0]):
            per_seed = [c[i]["migrated"] for c in chains]
            migrated, sd = _mean_sd(per_seed)
            # step 0 is the trained source store itself: the same for every seed, no spread to show
            steps.append({**first, "migrated": migrated, "migrated_sd": sd if i else None, "per_seed": per_seed})
        return {"metric": metric, "steps": steps, "seeds": seeds, "chain": chain}

    def _chain(self, seed: int) -> list[dict]:
        metric, chain = self.metric(), self.cfg.experiments.chain
        first = self.store(chain[0])
        steps = [{"model": chain[0], "migrated": first["methods"][metric], "retrained": first["methods"][metric],
                  "store": first["path"], "run": None}]
        for i, (s, t) in enumerate(zip(chain, chain[1:])):
            store = None if i == 0 else steps[-1]["store"]  # step 1 starts from the trained store
            r = self.puma(s, t, store=store, tag="" if i == 0 else f"chain{i + 1}-", seed=seed)
            steps.append({"model": t, "migrated": r["methods"]["puma"][metric],
                          "retrained": self.store(t)["methods"][metric], "store": r["store"],
                          "run": r["benchmark_run"]})
        return steps

    def figure6(self) -> dict:
        """Each source alone and all aggregated into one adapter, per seed; bars are the means over the seeds."""
        metric, agg, seeds = self.metric(), self.cfg.experiments.aggregation, self.cfg.experiments.seeds
        srcs, tgt = agg["sources"], agg["target"]
        sel = self.base.selection
        per_seed: dict[str, list[float]] = {}
        for seed in seeds:
            for s in srcs:
                per_seed.setdefault(f"{s} alone", []).append(self.puma(s, tgt, seed=seed)["methods"]["puma"][metric])
            both = self.migrate(f"{'+'.join(srcs)}-to-{tgt}-{sel.strategy}-b{sel.budget:g}{_seed_tag(seed, self.base)}",
                                [(self.store(s)["path"], s) for s in srcs], tgt, baselines=PUMA_ONLY,
                                **_seed_sections(seed, self.base, {}))
            per_seed.setdefault(" + ".join(srcs), []).append(both["methods"]["puma"][metric])
        stats = {name: _mean_sd(values) for name, values in per_seed.items()}
        return {"metric": metric, "target": tgt, "bars": {k: m for k, (m, _) in stats.items()},
                "bars_sd": {k: sd for k, (_, sd) in stats.items()}, "per_seed": per_seed, "seeds": seeds,
                "retrained": self.store(tgt)["methods"][metric]}

    def metric(self) -> str:
        return get_task(self.dataset().task).primary

    def run(self, on_progress: Callable[[dict], None] | None = None) -> dict:
        """All the experiments the config asks for; `on_progress(result so far)` after each one (a long benchmark
        shows its first tables while the rest runs)."""
        t0 = time.perf_counter()
        ex = self.cfg.experiments
        ds = self.dataset()
        result = {"task": ds.task, "data": ds.summary(), "machine": machine(),
                  # the LLM-free rows every table is read against (the same test records as every method)
                  "reference": reference_metrics(ds.task, ds.split("train"), ds.split("test"))}
        self.resolve(self.cfg.source, self.cfg.target)
        if ex.shared_prompt:  # first: the control is cheap and the stores table reads it
            for family in (self.cfg.source, self.cfg.target):
                self.store(family)
                self.shared_store(family)
        plan = [("table2", ex.main, self.table2), ("table2_all_users", ex.table2_all_users, self.table2_all_users),
                ("table4", ex.strategies, self.table4),
                ("figure3", ex.random_budgets, self.figure3), ("figure4", ex.cross_family, self.figure4),
                ("figure5", ex.chain, self.figure5), ("figure6", ex.aggregation, self.figure6)]
        for key, wanted, fn in plan:
            if wanted:
                self.log(f"== {key}")
                result[key] = fn()
                if on_progress:
                    on_progress(self._summary(result, t0, done=False))
        return self._summary(result, t0, done=True)

    def _summary(self, result: dict, t0: float, done: bool) -> dict:
        return {**result, "complete": done, "stores": self.stores,
                "runs": {n: {"path": join(self.output, "runs", n), "puma": r["methods"]["puma"], "wall_s": r["wall_s"]}
                         for n, r in self.runs.items()},
                "wall_s": round(time.perf_counter() - t0, 1), "provenance": provenance(to_dict(self.cfg))}


# ---------------------------------------------------------------------------------------------- benchmark.md


__all__ = ["BenchmarkJobConfig", "ExperimentsConfig", "Benchmark"]  # benchmark.md: reports/benchmark.py
