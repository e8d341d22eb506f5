"""Ray Tune, as the sweep recipe (recipes/sweep_on_tune.py) uses it: the search space and searcher of a
SearchConfig, a trial's id and its one report, and a Tuner run over a function trainable."""
from __future__ import annotations

from ray import tune

from puma_ray.fs import StorageOptions, pyarrow_filesystem


def search_space(search) -> dict:
    """grid: every combination of the listed values; optuna: categorical strategy / K / budget / adapter / seed, lr
    log-uniform between the smallest and largest listed (a constant when only one is listed). No adapters listed:
    the constant None (the migrate section's adapter)."""
    if search.kind == "grid":
        space = {"strategy": tune.grid_search(list(search.strategies)), "k": tune.grid_search(list(search.ks)),
                 "budget": tune.grid_search(list(search.budgets)), "lr": tune.grid_search(list(search.lrs)),
                 "seed": tune.grid_search(list(search.seeds))}
        space["adapter"] = tune.grid_search(list(search.adapters)) if search.adapters else None
        return space
    lo, hi = min(search.lrs), max(search.lrs)
    return {"strategy": tune.choice(list(search.strategies)), "k": tune.choice(list(search.ks)),
            "budget": tune.choice(list(search.budgets)), "lr": tune.loguniform(lo, hi) if lo < hi else lo,
            "seed": tune.choice(list(search.seeds)),
            "adapter": tune.choice(list(search.adapters)) if search.adapters else None}


def search_algorithm(search, objectives: dict[str, str]):
    """None (Tune's grid/variant generator) or multi-objective Optuna over `objectives` ({metric: "max"/"min"})."""
    if search.kind == "grid":
        return None
    from ray.tune.search.optuna import OptunaSearch
    return OptunaSearch(metric=list(objectives), mode=list(objectives.values()), seed=search.seed)


def trial_id() -> str:
    return tune.get_context().get_trial_id()


def report_trial(metrics: dict) -> None:
    tune.report(metrics)


def run_tuner(trainable, resources: dict, param_space: dict, *, num_samples: int, max_concurrent: int, search_alg,
              storage_path: str, storage: StorageOptions | None, **parameters) -> list:
    """Tune results of `trainable(config, **parameters)` (the parameters shipped once through the object store),
    each trial holding `resources`."""
    fs, path = pyarrow_filesystem(storage_path, storage)
    runnable = tune.with_resources(tune.with_parameters(trainable, **parameters), resources)
    tuner = tune.Tuner(
        runnable, param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=num_samples, max_concurrent_trials=max_concurrent,
                                    search_alg=search_alg,
                                    reuse_actors=True),  # a trial process imports torch + transformers once
        run_config=tune.RunConfig(name="sweep", storage_path=path, storage_filesystem=fs, verbose=1))
    return list(tuner.fit())


def cluster_resources() -> dict:
    import ray
    return ray.cluster_resources()
