"""A migration's last two stages' shared parts: the conversion call and report.json's shape (read by the markdown
report, the benchmark and the tests), and its console table."""
from __future__ import annotations

import dataclasses
import os

from puma_ray.artifacts.formats import sha256_hex
from puma_ray.config import to_dict
from puma_ray.conversion.run import convert, run_locally
from puma_ray.recipes.runs import provenance
from puma_ray.tasks import get_task

from .config import MigrateJobConfig


def foundation_cards(cfg: MigrateJobConfig) -> dict:
    """{model folder: its foundation card} for the models of this run that were pretrained here (family, width,
    seed, the train records they read, recipe, wall)."""
    from puma_ray.recipes.foundation import read_card
    folders = [m.name for m in [*(s.model for s in cfg.sources), cfg.target] if os.path.isdir(m.name)]
    return {f: card for f in folders if (card := read_card(f))}


def convert_everyone(cfg: MigrateJobConfig, adapter_path: str, source_paths: list[str], target_path: str,
                     puma_test: dict, convert_runner, log) -> dict:
    """Every user of the source store(s) through the saved adapter into the target store (manifest last); the
    conversion's provenance carries PUMA's test metrics."""
    convert_cfg = dataclasses.replace(cfg.convert, missing_policy=cfg.sources_missing_policy,
                                      overwrite=cfg.convert.overwrite or cfg.store.overwrite)
    conversion = convert(adapter_path, source_paths, target_path, convert_cfg, cfg.storage,
                         run_locally if cfg.convert.runs_on == "local" else convert_runner,
                         provenance={**provenance(to_dict(cfg)), "test": puma_test}, log=log)
    log(f"converted {conversion['users']} users → {target_path} ({conversion['rows_per_s']} rows/s)")
    return conversion


def migration_report(cfg: MigrateJobConfig, *, task, sources, target, budget, users, chosen, valid_idx, methods,
                     reference, costs, metric, target_path, adapter_path, conversion, source_reports, fits, data,
                     wall_s, **extra) -> dict:
    """report.json of a migration, whichever executor ran it: one shape for the markdown report and the tests."""
    sel = cfg.selection
    report = {
        "task": task, "source": sources[0], "sources": sources, "target": target,
        "selection": {"strategy": sel.strategy, "k": sel.k, "budget": budget, "users_selected": int(len(chosen)),
                      "users_total": len(users), "validation_users": int(len(valid_idx)),
                      # which users the adapter was fitted on, without listing them (compare two runs)
                      "selected_sha256": sha256_hex("\n".join(map(str, users[chosen])).encode())},
        "methods": methods, "reference": reference, "cost": costs, "primary_metric": metric,
        "store": target_path, "adapter": adapter_path, "conversion": conversion,
        "source_training": {p: {"methods": r["methods"], "cost": r["cost"]} for p, r in source_reports.items()},
        "fits": {k: v.summary() for k, v in fits.items()},
        "data": data, "wall_s": round(wall_s, 2),
        "provenance": provenance(to_dict(cfg)), "foundations": foundation_cards(cfg), **extra,
    }
    if "full_retrain" in costs:
        report["cost_ratio_full_retrain_over_puma"] = {
            k: costs["full_retrain"][k] / costs["puma"][k] for k in ("wall_s", "work_s", "llm_record_passes", "flops")
            if costs["puma"].get(k) and k in costs["full_retrain"]}
    return report


def format_report(report: dict) -> str:
    keys = get_task(report["task"]).metrics
    # the name column fits the longest name (a candidate is `adapter_mlp_skip_32`), so the figures stay aligned
    w = max([14, *(len(n) + 1 for n in report["methods"]), *(len(n) + 3 for n in report.get("reference", {}))])
    lines = [f"{'method':<{w}}" + "".join(f"{k:>9}" for k in keys)
             + f"{'wall_s':>10}{'start-up':>10}{'LLM passes':>12}{'FLOPs':>11}"]
    for name, m in report["methods"].items():
        c = report["cost"].get(name, {})
        lines.append(f"{name:<{w}}" + "".join(f"{m.get(k, float('nan')):>9.4f}" for k in keys)
                     + f"{c.get('wall_s', 0):>10.1f}{c.get('startup_s', 0):>10.1f}{c.get('llm_record_passes', 0):>12,}"
                     f"{c.get('flops', 0):>11.2e}")
    for name, m in report.get("reference", {}).items():  # no LLM, fitted on the train split: nothing to pay
        lines.append(f"{name + ' *':<{w}}" + "".join(f"{m.get(k, float('nan')):>9.4f}" for k in keys))
    if report.get("reference"):
        lines.append("* reference rows: no LLM, fitted on the train split, same test records")
    ratio = report.get("cost_ratio_full_retrain_over_puma")
    if ratio:
        lines.append("cost full retraining / PUMA: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratio.items()))
    return "\n".join(lines)
