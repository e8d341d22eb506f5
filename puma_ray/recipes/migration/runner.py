"""Runs a migration's stages (stages.py) in order under the run ledger (ledger.py).

After the first stage (the sources: a load) every stage's identity is known, so the run decides up front what each
stage does: `run` (no record of this identity, or named in `--stages`), `reuse` (finished earlier with the same
settings and inputs: its output comes back from the ledger), `skip` (`--skip`: its empty output) or `stop` (after
the last stage `--stages` names). Each finished stage's record is written last, so a run killed anywhere is
resumed by the same command: finished stages are reused, the killed one runs again (its own resumable parts, the
Ray Train fit's checkpoints and the conversion's units, resume inside it).
"""
from __future__ import annotations

import dataclasses
import time

from puma_ray.config import ConfigError, to_dict
from puma_ray.errors import StoreError
from puma_ray.training.run_identity import RunIdentity

from .config import MigrateJobConfig, resolve_foundations
from .executor import Executor, Run
from .in_process import InProcess
from .ledger import MUST_RUN, Ledger, settings_of, stage_identity
from .stages import STAGES, Stage

RUN, REUSE, SKIP, STOP = "run", "reuse", "skip", "stop"


def sources_identity(cfg: MigrateJobConfig, src) -> str:
    """The first stage's identity, from what it found: the data's settings and summary, the joined users, and
    every source store's manifest (its shards' checksums, model, template)."""
    ident = RunIdentity("migration-stage:sources")
    ident.add("data", to_dict(cfg.data))
    ident.add("summary", src.data)
    ident.add_array("users", src.users)
    ident.add("stores", [dataclasses.asdict(s.manifest) for s in src.stores])
    return ident.hexdigest()


def check_stage_names(stages: list[Stage], only, skip) -> None:
    names = [s.name for s in stages]
    for flag, given in (("--stages", only or ()), ("--skip", skip)):
        for name in given:
            if name not in names:
                raise ConfigError(f"{flag}: no stage {name!r}; stages: {', '.join(names)}")
    for name in skip:
        stage = stages[names.index(name)]
        if stage.skipped is None:
            raise ConfigError(f"--skip {name}: later stages read its output; it cannot be skipped (skippable: "
                              f"{', '.join(s.name for s in stages if s.skipped is not None)})")


def decide(stages: list[Stage], ids: dict, ledger: Ledger, only, skip) -> tuple[dict, dict]:
    """({stage: action}, {stage: ledger record of a reused stage}) for every stage after the first."""
    last = max(i for i, s in enumerate(stages) if s.name in only) if only else len(stages) - 1
    actions, found = {}, {}
    for i, stage in enumerate(stages[1:], start=1):
        if i > last:
            actions[stage.name] = STOP
        elif stage.name in skip:
            actions[stage.name] = SKIP
        elif stage.save is None or (only and stage.name in only):
            actions[stage.name] = RUN
        elif (record := ledger.finished(stage.name, ids[stage.name])) is not None:
            actions[stage.name], found[stage.name] = REUSE, record
        elif only:
            raise ConfigError(f"--stages: stage {stage.name!r} has not finished in this output with these settings "
                              f"({ledger.folder}); name it in --stages too, or run the whole migration")
        else:
            actions[stage.name] = RUN
    for stage in reversed(stages[1:]):  # a stage whose record gives back less than a running reader needs
        if actions[stage.name] == REUSE and any(actions.get(c) == RUN for c in stage.full_for):
            actions[stage.name] = RUN
    return actions, found


def identities(stages: list[Stage], cfg_dict: dict, first: str, skip) -> dict:
    ids = {stages[0].name: first}
    for stage in stages[1:]:
        ids[stage.name] = ("skipped" if stage.name in skip else
                           stage_identity(stage.name, settings_of(cfg_dict, stage.settings),
                                          {name: ids[name] for name in (stage.depends or stage.inputs)}))
    return ids


def _restore(stage: Stage, this: Run, ex: Executor, ledger: Ledger, record: dict, inputs: list):
    try:
        return stage.restore(this, ex, ledger, record, *inputs)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, StoreError):
            raise
        raise StoreError(f"{ledger.folder}/{stage.name}.json: not a record of this stage "
                         f"({type(e).__name__}: {str(e)[:200]})") from None


class StageETA:
    """The time left, from this run's own rate: LLM record passes the plan (plan.py, counts only) gives each stage
    that runs, over the seconds the finished ones took. None before any LLM work has finished."""

    def __init__(self, planned: dict):
        self.planned, self.passes, self.seconds = planned, 0, 0.0

    @classmethod
    def of(cls, cfg, output: str, records, actions: dict) -> "StageETA | None":
        from puma_ray.data import Dataset
        if not isinstance(records, Dataset):  # the Ray executor's records stay in files: no second read here
            return None
        from .plan import plan_migration
        try:
            plan = plan_migration(cfg, output, log=lambda _: None, ds=records, models=False)
        except Exception:  # noqa: BLE001 — an estimate must never stop the run it estimates
            return None
        return cls({s["stage"]: s["llm_record_passes"] for s in plan["stages"] if actions.get(s["stage"]) == RUN})

    def done(self, stage: str, seconds: float) -> None:
        if self.planned.get(stage):
            self.passes += self.planned.pop(stage)
            self.seconds += seconds

    def describe(self) -> str:
        left = sum(self.planned.values())
        if not self.passes or not left:
            return ""
        return f", ETA ~{_clock(left * self.seconds / self.passes)} at this run's {self.passes / self.seconds:,.0f} " \
            "LLM record passes/s"


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def run(cfg: MigrateJobConfig, output: str, log=print, executor: Executor | None = None,
        stages: list[Stage] = STAGES, only: list[str] | None = None, skip: list[str] = ()) -> dict | None:
    """Every stage in order under `executor` (None: InProcess with this process's fit and conversion), reusing
    what the ledger in `output` holds; `only` (--stages) runs just those stages (the ones before them must have
    finished), `skip` (--skip) leaves baselines or the gate out. Returns the report (None when `only` stops
    before it)."""
    started = time.perf_counter()
    ex = executor or InProcess()
    ex.check(cfg)
    check_stage_names(stages, only, skip)
    this = Run(resolve_foundations(cfg, log), output, log, started)
    ledger = Ledger(output, cfg.storage, log)
    last_read = {name: i for i, stage in enumerate(stages) for name in stage.inputs}
    outputs, actions, found, ids, n = {}, {stages[0].name: RUN}, {}, {}, len(stages)
    eta = None
    for i, stage in enumerate(stages):
        action = actions[stage.name]
        if action == STOP:
            continue
        log(f"stage {i + 1}/{n} {stage.name} (elapsed {_clock(time.perf_counter() - started)}"
            + (eta.describe() if eta is not None and action == RUN else "") + ")"
            + {REUSE: ": finished earlier with the same settings and inputs, reused from the ledger",
               SKIP: ": skipped (--skip)"}.get(action, ""))
        inputs = [outputs[name] for name in stage.inputs]
        t0 = time.perf_counter()
        out = None
        if action == SKIP:
            out = stage.skipped(this)
        elif action == REUSE:
            out = _restore(stage, this, ex, ledger, found[stage.name], inputs)
            action = RUN if out is MUST_RUN else action
        if action == RUN:
            if stage.save is not None and ledger.forget(stage.name):  # killed from here on: no stale record left
                this.replacing.add(stage.name)
            out = stage.fn(this, ex, *inputs)
            if stage.save is not None:
                ledger.record(stage.name, ids[stage.name], stage.save(this, ledger, out, *inputs),
                              time.perf_counter() - t0)
        this.stages[stage.name] = {"status": {RUN: "ran", REUSE: "reused", SKIP: "skipped"}[action],
                                   "wall_s": round(time.perf_counter() - t0, 3)}
        outputs[stage.name] = out
        if i == 0:  # every identity follows from the first stage's (what was found) and the settings
            ids = identities(stages, to_dict(this.cfg), sources_identity(this.cfg, out), skip)
            decided, found = decide(stages, ids, ledger, only, skip)
            actions.update(decided)
            eta = StageETA.of(this.cfg, output, out.records, actions)
            if eta is not None:
                eta.done(stage.name, time.perf_counter() - t0)  # a source store trained first is LLM work too
        elif eta is not None:
            eta.done(stage.name, time.perf_counter() - t0)
        for name in [nm for nm in outputs if last_read.get(nm, n) <= i]:
            del outputs[name]  # no later stage reads it
    ran = [name for name, s in this.stages.items() if s["status"] == "ran"]
    reused = [name for name, s in this.stages.items() if s["status"] == "reused"]
    log(f"stages run: {', '.join(ran) or 'none'}; reused from the ledger: {', '.join(reused) or 'none'}")
    return outputs.get(stages[-1].name) if actions[stages[-1].name] != STOP else None
