"""The shipping rule over finished migrations: each candidate adapter (PUMA, the linear map) scored on every
user's validation records (the rule `ship: validation` applies since 94e23f2) and on the fit's validation users
only (the rule before), beside the test figures the migration reported. Nothing is refitted or written.

    .venv/bin/python benchmarks/ship_rule.py RUN [RUN ...]      (migration output folders, e.g. the benchmark's
                                                                  runs/bench/runs/main-llama-to-phi3{,-s1,-s2})
Prints one row per run: both figures per candidate, what each rule ships, and the shipped adapter's test RMSE
against the linear map's.
"""
from __future__ import annotations

import argparse
import json
import os

from puma_ray.artifacts.adapter_io import load_adapter
from puma_ray.artifacts.store import PromptStore
from puma_ray.config import ModelConfig, TemplateConfig, from_dict
from puma_ray.conversion.run import join_sources
from puma_ray.data import load_dataset
from puma_ray.models.backbone import load_model
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.recipes.migration.config import MigrateJobConfig
from puma_ray.recipes.train_prompts import item_texts
from puma_ray.training.evaluate import evaluate
from puma_ray.training.fit import mapped_prompts
from puma_ray.training.records import RecordSet


def score(run: str) -> dict:
    with open(os.path.join(run, "report.json")) as f:
        report = json.load(f)
    cfg = from_dict(MigrateJobConfig, report["provenance"]["config"], f"{run}/report.json config")
    ds = load_dataset(cfg.data, cfg.storage)
    stores = [PromptStore.open(s.store.format(output=run), cfg.storage) for s in cfg.sources]
    joined = join_sources(stores, cfg.sources_missing_policy)
    template = from_dict(TemplateConfig, stores[0].manifest.template, "store template")
    target = load_model(ModelConfig(name=report["target"]["name"]))
    plm = PromptedLM(target, template, stores[0].manifest.prompt_length, item_texts(ds), 0)
    valid = ds.split("valid")
    valid = RecordSet.from_frame(valid[valid["user_id"].isin(joined.users)], joined.users)
    row = {"run": os.path.basename(run.rstrip("/")), "fit_validation": report["adapter_choice"]["validation"]}
    row["every_user_validation"], row["test"] = {}, {}
    for name, path in (("puma", os.path.join(run, "adapter")), ("linear", os.path.join(run, "baselines",
                                                                                         "linear-adapter"))):
        adapter, head, _ = load_adapter(path)
        adapter.eval()
        row["every_user_validation"][name] = float(evaluate(plm, head, ds.task, mapped_prompts(adapter, joined.prompts),
                                                            valid, 512)["rmse"])
        row["test"][name] = float(report["methods"][name]["rmse"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    rows = [score(r) for r in ap.parse_args().runs]
    print(f"{'run':<26}{'fit-valid puma/linear':>24}{'all-valid puma/linear':>24}{'test puma/linear':>20}"
          f"{'old ships':>11}{'new ships':>11}")
    for r in rows:
        old = min(r["fit_validation"], key=r["fit_validation"].get)
        new = min(r["every_user_validation"], key=r["every_user_validation"].get)
        f, a, t = r["fit_validation"], r["every_user_validation"], r["test"]
        print(f"{r['run']:<26}{f['puma']:>12.4f}{f['linear']:>12.4f}{a['puma']:>12.4f}{a['linear']:>12.4f}"
              f"{t['puma']:>10.4f}{t['linear']:>10.4f}{old:>11}{new:>11}")
    rules = (("old (fit's validation users)", "fit_validation"), ("new (every user)", "every_user_validation"))
    for rule, key in rules:
        shipped = [r["test"][min(r[key], key=r[key].get)] for r in rows]
        linear = [r["test"]["linear"] for r in rows]
        print(f"{rule}: shipped mean test RMSE {sum(shipped) / len(shipped):.4f} vs the linear map's "
              f"{sum(linear) / len(linear):.4f}")


if __name__ == "__main__":
    main()
