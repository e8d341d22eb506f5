"""The sweep on Ray Tune: each trial a Tune function trainable that selects users, fits the adapter and scores it on
the validation records (recipes.sweep.run_trial); with engine.kind "ray" the fit is a Ray Train + DeepSpeed run
started from inside the trial (Train V2: a TorchTrainer's fit() called in the trainable), with "local" the
in-process fit. Tune itself is reached through puma_ray.ray_layer.tune.

Resources, so that concurrent trials never starve each other (a 2-CPU machine hangs silently otherwise):
- engine "ray": a trial process reserves only `search.driver_cpus` (it selects and evaluates); its Train run
  reserves num_workers x cpus_per_worker in a placement group of its own, outside the trial's. Tune knows nothing of
  the latter, so the number of concurrent trials is capped at what the cluster holds for driver + workers together
  (and at search.max_concurrent_trials): a trial never waits for Train workers that other trials hold.
- engine "local": a trial reserves `search.cpus_per_trial` and fits in its own process with as many torch threads.

The shared work (data, source stores, per-user features) is done once in the driver; trials get it as one
object-store reference. Trials report once, at the end: their objectives (validation quality, LLM record passes)
exist only after the fit and the evaluation, and an intermediate report without them fails Tune's strict metric
check under a searcher with metrics (Optuna).
"""
from __future__ import annotations

import json
import os
import time

from puma_ray.config import to_dict
from puma_ray.data import records_in_place
from puma_ray.fs import absolute, join
from puma_ray.ray_layer import ensure_ray, make_ray_fit, make_variance_fn
from puma_ray.ray_layer.tune import (
    cluster_resources,
    report_trial,
    run_tuner,
    search_algorithm,
    search_space,
    trial_id,
)
from puma_ray.recipes.migration.config import resolve_foundations
from puma_ray.recipes.runs import provenance
from puma_ray.recipes.sweep import (
    COST_KEY,
    SETTING_KEYS,
    SweepError,
    SweepJobConfig,
    build_report,
    check_feasible,
    maximize,
    prepare_context,
    run_trial,
)
from puma_ray.selection.statistics import label_variance
from puma_ray.training.reference import reference_metrics


def trial_resources(cfg: SweepJobConfig, cluster: dict) -> tuple[dict, int]:
    """({"cpu": .., "gpu": ..} of a trial's own process, how many trials may run at once)."""
    engine, search = cfg.job.engine, cfg.search
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if engine.kind == "local":
        own, need_cpu, need_gpu = search.cpus_per_trial, search.cpus_per_trial, 0.0
    else:  # the Train run's workers sit in their own placement group: count them here, reserve them there
        own = search.driver_cpus
        need_cpu = own + engine.num_workers * engine.cpus_per_worker
        need_gpu = engine.num_workers if engine.use_gpu else 0.0
    fits = int(cpus / need_cpu + 1e-9)
    if need_gpu:
        fits = min(fits, int(gpus / need_gpu + 1e-9))
    if fits < 1:
        raise SweepError(f"one trial needs {need_cpu:g} CPU(s)" + (f" and {need_gpu:g} GPU(s)" if need_gpu else "")
                         + f" (trial process + Train workers); the cluster has {cpus:g} CPU(s), {gpus:g} GPU(s): "
                         "lower engine.num_workers / engine.cpus_per_worker / search.driver_cpus")
    return {"cpu": own}, min(fits, search.max_concurrent_trials or fits)


def trial(config: dict, ctx, cfg: SweepJobConfig, train_storage: str) -> None:
    """One Tune trial (runs in a Tune actor): run_trial with this process's or a Ray Train fit, then one report."""
    import warnings

    import torch

    from puma_ray.training.fit import fit_mapping
    job = cfg.job
    this_trial = trial_id()
    setting = {k: config.get(k) for k in SETTING_KEYS}
    # the shared arrays arrive read-only from the object store; they are only ever read
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    if job.engine.kind == "local":
        torch.set_num_threads(job.threads or max(1, int(cfg.search.cpus_per_trial)))
        fit_fn = fit_mapping
    else:
        torch.set_num_threads(1)  # this process only evaluates; the Train workers set their own threads
        fit_fn = make_ray_fit(job.engine, job.target, train_storage, job.storage,
                              run_name=f"{job.engine.run_name or 'sweep'}-{this_trial}")
    result = run_trial(ctx, job, setting, fit_fn, log=lambda m: print(f"[trial {this_trial}] {m}", flush=True))
    result["trial_id"] = this_trial
    report_trial({"quality": result["quality"], COST_KEY: result["cost"][COST_KEY], "trial_json": json.dumps(result)})


def run_sweep(cfg: SweepJobConfig, output: str, log=print) -> dict:
    """The whole sweep: shared preparation, the Tune run, the report (recipes.sweep.build_report's contract)."""
    start = time.perf_counter()
    cfg.job = resolve_foundations(cfg.job, log)  # pretrained once here; every trial loads the same folders
    job, search = cfg.job, cfg.search
    output = absolute(output)  # trial processes run elsewhere
    # trials keep the driver's working directory (relative model folders, data paths), not Tune's trial folder
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    ensure_ray(job.engine.address, job.engine.local_cpus)
    variance_fn = label_variance
    if job.engine.kind == "ray":
        variance_fn = make_variance_fn(records_in_place(job.data, job.storage), job.storage)
    ctx = prepare_context(job, search.strategies, output, log, variance_fn)
    check_feasible(search, ctx)
    resources, concurrent = trial_resources(cfg, cluster_resources())
    up = maximize(ctx.metric)
    trials_planned = search.grid_size() * search.num_samples if search.kind == "grid" else search.num_samples
    log(f"sweep ({search.kind}): {trials_planned} trials, {concurrent} at a time, each {resources} "
        f"+ engine {job.engine.kind}")
    train_storage = absolute(job.engine.storage_path or join(output, "train"))
    results = run_tuner(trial, resources, search_space(search), num_samples=search.num_samples,
                        max_concurrent=concurrent,
                        search_alg=search_algorithm(search, {"quality": "max" if up else "min", COST_KEY: "min"}),
                        storage_path=search.storage_path or join(output, "tune"), storage=job.storage,
                        ctx=ctx, cfg=cfg, train_storage=train_storage)
    trials, failed = [], []
    for result in results:
        setting = {k: (result.config or {}).get(k) for k in SETTING_KEYS}
        if result.error is not None or not result.metrics or "trial_json" not in result.metrics:
            failed.append({"config": setting, "error": str(result.error or "no result reported").strip()[-2000:]})
        else:
            trials.append(json.loads(result.metrics["trial_json"]))
    for f in failed:
        log(f"trial {f['config']} failed: {f['error'].splitlines()[-1] if f['error'] else ''}")
    return build_report(trials, search.tolerance, failed, search=to_dict(search), engine=job.engine.kind,
                        concurrent_trials=concurrent, trial_resources=resources, source_stores=ctx.source_stores,
                        source_training=ctx.source_training, data=ctx.ds.summary(),
                        reference=reference_metrics(ctx.task, ctx.ds.split("train"), ctx.ds.split("valid")),
                        wall_s=round(time.perf_counter() - start, 2),
                        provenance=provenance({"migrate": cfg.migrate, "search": to_dict(search)}))
