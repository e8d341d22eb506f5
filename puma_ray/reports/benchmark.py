"""benchmark.md: the benchmark's tables (Tables 2-4, the figures' tables, spread notes, reference rows) and
plots, from the result `recipes/benchmark.Benchmark.run` returns."""
from __future__ import annotations

import os

from puma_ray.artifacts.formats import REPORT_FORMATS
from puma_ray.fs import join, write_json_to
from puma_ray.reports.markdown import (
    REFERENCE_LABELS,
    ReportWriter,
    cost_table,
    fmt,
    md_table,
    method_label,
    metric_name,
    metrics_table,
    ordered_methods,
    plot_bars,
    plot_chain,
    plot_gain_heatmap,
    plot_metric_bars,
    plot_quality_vs_budget,
)
from puma_ray.tasks import get_task


def _ranked_marks(values: list[float], lower: bool) -> list[str]:
    """Table 4's marks: best in bold, second best underlined."""
    order = sorted(range(len(values)), key=lambda i: values[i] if lower else -values[i])
    marks = [""] * len(values)
    if order:
        marks[order[0]] = "best"
    if len(order) > 1:
        marks[order[1]] = "second"
    return marks


def _mark(value: float, mark: str) -> str:
    return {"best": f"**{fmt(value)}**", "second": f"<u>{fmt(value)}</u>"}.get(mark, fmt(value))


def _pm(text: str, sd: float | None, n: int | None) -> str:
    """A cell "mean ± sd" when the row has several seeds; a single run stays a plain number."""
    return f"{text} ± {sd:.4f}" if n and n > 1 and sd is not None else text


def _seeds_line(figure: dict) -> str:
    seeds = figure.get("seeds", [0])
    return (f"Seeds (selection + adapter fit): {seeds}; migrated figures are the mean ± sample sd over them, the "
            "retrained stores are one training each." if len(seeds) > 1 else f"One seed ({seeds[0]}).")


def table4_markdown(rows: list[dict], task: str) -> str:
    cols = get_task(task).metrics
    ranked = [r for r in rows if not r["label"].startswith("Random (")]  # baselines are not ranked (the paper's rule)
    marks = {c: dict(zip(map(id, ranked), _ranked_marks([r["metrics"][c] for r in ranked], c in ("rmse", "mae"))))
             for c in cols}
    body = [[r["label"], r["users"], *[_pm(_mark(r["metrics"][c], marks[c].get(id(r), "")),
                                           r.get("spread", {}).get(c), r.get("n")) for c in cols],
             r.get("n", 1), r["llm_record_passes"], fmt(float(r["wall_s"]), 1)] for r in rows]
    return md_table(["strategy", "users", *[metric_name(c) for c in cols], "seeds", "LLM record passes",
                     "wall (s)"], body)


def reference_line(reference: dict | None, task: str) -> str:
    """The reference rows as one line under a table whose rows are not methods (strategies, budgets, pairs)."""
    if not reference:
        return ""
    metric = get_task(task).primary
    return ("Reference rows (no LLM, fitted on the train split, the same test records): " + ", ".join(
        f"{REFERENCE_LABELS.get(n, n).replace(' (no LLM)', '')} {fmt(m.get(metric))}" for n, m in reference.items())
        + f" ({metric_name(metric)}).")


def seeded_metrics_table(table: dict, task: str) -> str:
    """Table 2 over seeds: mean ± sd per method and n, then the reference rows (no LLM, the same test records)."""
    cols = get_task(task).metrics
    rows = [[method_label(name), *[_pm(fmt(m.get(c)), table.get("spread", {}).get(name, {}).get(c),
                                       table.get("n", {}).get(name)) for c in cols], table.get("n", {}).get(name, 1)]
            for name, m in ((n, table["methods"][n]) for n in ordered_methods(table["methods"]))]
    rows += [[REFERENCE_LABELS.get(name, name), *[fmt(m.get(c)) for c in cols], "–"]
             for name, m in table.get("reference", {}).items()]
    return md_table(["method", *[metric_name(c) for c in cols], "seeds"], rows)


def shipped_markdown(table: dict, task: str) -> str:
    """Per seed: which adapter `ship` chose on the validation users' records, the candidates' validation and test
    figures, and a verdict line: the shipped adapter's mean test figure against the linear map's."""
    shipped = table.get("shipped") or {}
    if not shipped:
        return ""
    metric = get_task(task).primary
    names = list(dict.fromkeys(n for row in shipped.values() for n in row["validation"]))
    body = [[seed, method_label(row["adapter"]), *[row["validation"].get(n) for n in names],
             *[row["test"].get(n) for n in names], row["test"].get(row["adapter"])] for seed, row in shipped.items()]
    lines = [md_table(["seed", "shipped", *[f"valid {metric_name(metric)} {method_label(n)}" for n in names],
                       *[f"test {metric_name(metric)} {method_label(n)}" for n in names],
                       f"test {metric_name(metric)} shipped"], body)]
    tests = {n: [row["test"][n] for row in shipped.values() if n in row["test"]] for n in names}
    got = [row["test"][row["adapter"]] for row in shipped.values() if row["adapter"] in row["test"]]
    if got and tests.get("linear"):
        lower = metric in ("rmse", "mae")
        a, b = sum(got) / len(got), sum(tests["linear"]) / len(tests["linear"])
        ok = a <= b if lower else a >= b
        lines.append(f"Mean test {metric_name(metric)}: shipped {a:.4f}, linear map {b:.4f}: the shipped adapter is "
                     + ("**no worse than the linear map**" if ok else "**worse than the linear map**") + ".")
    return "\n\n".join(lines)


def spectrum_markdown(rows: list[dict]) -> str:
    """Table 4's strategies by the variance quintiles of the users they chose (mean over seeds)."""
    rows = [r for r in rows if r.get("quintiles")]
    if not rows:
        return ""
    body = []
    for r in rows:
        q = [sum(c[i] for c in r["quintiles"]) / len(r["quintiles"]) for i in range(5)]
        body.append([r["label"], r["users"], *[f"{v:.1f}" for v in q], f"{q[0] + q[4]:.1f}",
                     sum(r["variance_sd"]) / len(r["variance_sd"]),
                     f"{sum(r['matches_run'])}/{len(r['matches_run'])}"])
    all_sd = rows[0]["variance_sd_all_users"]
    return ("Users chosen per quintile of training-label variance (Q1 lowest; mean over the seeds), the chosen "
            f"users' variance sd (all users: {all_sd:.3f}); recomputed from the source store as each run selects, "
            "\"same set as run\" = seeds whose recomputed set hashes to the run's own.\n\n"
            + md_table(["strategy", "users", "Q1", "Q2", "Q3", "Q4", "Q5", "Q1 + Q5", "variance sd",
                        "same set as run"], body))


def _all_users_cost(t: dict) -> str:
    """One line: what fitting on every user cost (first seed's run) against full retraining."""
    puma, full = t.get("cost", {}).get("puma", {}), t.get("cost_full_retrain") or {}
    if not puma.get("llm_record_passes") or not full.get("llm_record_passes"):
        return ""
    ratio = full["llm_record_passes"] / puma["llm_record_passes"]
    return (f"Cost (first seed): PUMA on every user {fmt(puma['llm_record_passes'])} LLM record passes (its fit "
            f"and validation passes), full retraining {fmt(full['llm_record_passes'])}: full retraining / PUMA = "
            f"**{ratio:.2f}x** (below 1: fitting the adapter on everyone costs more than retraining every prompt).")


def spread_notes(table: dict, metric: str, pairs: list[tuple[str, str]]) -> str:
    """Says plainly which of `pairs` of rows differ by less than their spread (the larger of the two sds)."""
    notes = []
    for a, b in pairs:
        ma, mb = table["methods"].get(a), table["methods"].get(b)
        if not ma or not mb:
            continue
        gap = abs(ma[metric] - mb[metric])
        sd = max(table["spread"].get(a, {}).get(metric, 0.0), table["spread"].get(b, {}).get(metric, 0.0))
        verdict = "**within the spread: no difference shown**" if gap <= sd else "larger than the spread"
        notes.append(f"- {method_label(a)} vs {method_label(b)}: {metric_name(metric)} gap {gap:.4f}, "
                     f"spread (larger sd) {sd:.4f}: {verdict}")
    return "\n".join(notes)


def benchmark_markdown(result: dict, writer: ReportWriter | None, command: str | None = None) -> str:
    task = result["task"]
    m = result["machine"]
    parts = ["# PUMA benchmark", "\n".join([
             f"- data: {result['data'].get('name')}: {fmt(result['data'].get('users'))} users, "
             f"{fmt(result['data'].get('items'))} items",
             f"- machine: {m['cpus']} CPU core(s) ({m['cpu']}), GPU: {m['gpu'] or 'none'}",
             f"- wall time: {result['wall_s'] / 60:.1f} min" + ("" if result.get("complete", True) else
                                                                " so far (**still running**: partial results)"),
             *([f"- command: `{command}`"] if command else []),
             "- every run's own report: `runs/<name>/report.md`; all numbers: [benchmark.json](benchmark.json)"])]
    figure = (lambda name, png, caption: writer.figure(name, png, caption)) if writer else (lambda *a: "")
    ref_line = reference_line(result.get("reference"), task)
    if "table2" in result:
        t = result["table2"]
        metric = get_task(task).primary
        parts += ["## Table 2: quality (test split of all users)",
                  f"Seeds (selection + adapter fit): {t.get('seeds', [0])}; mean ± sample sd. Full retraining and "
                  "the source model do not depend on that seed (n = 1). Reference rows: no LLM, fitted on the "
                  "train split, scored on the same test records.",
                  seeded_metrics_table(t, task) if "spread" in t else metrics_table(t["methods"], task),
                  spread_notes(t, metric, [("puma", "linear"), ("puma", "full_retrain"), ("puma", "random_init")])
                  if "spread" in t else "",
                  figure("table2.png", plot_metric_bars(t["methods"], get_task(task).metrics, "Table 2: test metrics"),
                         "Table 2 as bars"),
                  "### The shipped adapter (`ship`: chosen on the validation users' records, never test)"
                  if t.get("shipped") else "", shipped_markdown(t, task),
                  "## Table 3: cost", cost_table(t["cost"], t.get("cost_ratio_full_retrain_over_puma"))]
    if "table2_all_users" in result:
        t = result["table2_all_users"]
        parts += ["## Table 2 in the paper's protocol: PUMA fitted on every user",
                  f"The paper's Table 2 caption: PUMA \"was trained using data from the entire user population in "
                  f"this experiment\". Here the adapter is fitted on all {t['users']} users (seeds {t['seeds']}); "
                  "with no user left to hold out, early stopping reads every user's validation records (disjoint "
                  "from their train and test records). Beside it: full retraining (n = 1) and PUMA at the budget "
                  f"({t['budget_users']} users, Table 2's runs).",
                  seeded_metrics_table(t, task),
                  spread_notes(t, get_task(task).primary, [("puma_all_users", "full_retrain"),
                                                           ("puma_all_users", "puma_budget")]),
                  _all_users_cost(t)]
    if "table4" in result:
        parts += ["## Table 4: selection strategies at one budget", table4_markdown(result["table4"], task), ref_line,
                  spectrum_markdown(result["table4"])]
    if "figure3" in result:
        f = result["figure3"]
        refs = {"retrained on the target": f["retrained"], f"PUMA at {f['puma']['users']} users": f["puma"]["value"]}
        series = {"random selection": [(p["users"], p["value"]) for p in f["random"]]}
        parts += ["## Figure 3: random selection, quality vs budget",
                  md_table(["users", metric_name(f["metric"]), "LLM record passes"],
                           [[p["users"], p["value"], p["llm_record_passes"]] for p in f["random"]]),
                  figure("figure3.png", plot_quality_vs_budget(series, f["metric"], refs, "users fitted on (budget)",
                                                               "Figure 3: random selection vs budget"),
                         "Figure 3: test metric of random selection at each budget"), ref_line]
    if "figure4" in result:
        f = result["figure4"]
        n = len(f.get("seeds", [0]))
        gains: dict = {}
        for c in f["cells"]:
            gains.setdefault(c["source"], {})[c["target"]] = c["gain"]
        parts += ["## Figure 4: migrations across model families", _seeds_line(f),
                  md_table(["source → target", f"migrated {metric_name(f['metric'])}", "retrained on target",
                            "source on its own model", "gain"],
                           [[f"{c['source']} → {c['target']}", _pm(fmt(c["migrated"]), c.get("migrated_sd"), n),
                             c["retrained"], c["source_on_source"], _pm(fmt(c["gain"]), c.get("gain_sd"), n)]
                            for c in f["cells"]]),
                  figure("figure4.png", plot_gain_heatmap(f["families"], gains),
                         "Figure 4: gain = retrained / migrated (> 1: migration beats retraining)"), ref_line]
    if "figure5" in result:
        f = result["figure5"]
        n = len(f.get("seeds", [0]))
        parts += ["## Figure 5: chain migration", _seeds_line(f),
                  md_table(["step", "model", f"{metric_name(f['metric'])} (migrated along the chain)",
                            "retrained on it"],
                           [[i, s["model"], _pm(fmt(s["migrated"]), s.get("migrated_sd"), n), s["retrained"]]
                            for i, s in enumerate(f["steps"])]),
                  figure("figure5.png", plot_chain([{"model": s["model"], "migrated": s["migrated"],
                                                     "sd": s.get("migrated_sd"), "retrained": s["retrained"]}
                                                    for s in f["steps"]], f["metric"],
                                                   "Figure 5: chain migration (step 0: the trained source)"),
                         "Figure 5: each step's prompts come from the previous step's migrated store"), ref_line]
    if "figure6" in result:
        f = result["figure6"]
        n, sds = len(f.get("seeds", [0])), f.get("bars_sd", {})
        parts += [f"## Figure 6: aggregated migration to {f['target']}", _seeds_line(f),
                  md_table(["source prompts", metric_name(f["metric"])],
                           [[k, _pm(fmt(v), sds.get(k), n)] for k, v in f["bars"].items()]),
                  figure("figure6.png", plot_bars(f["bars"], f["metric"],
                                                  f"Figure 6: aggregated migration to {f['target']}",
                                                  "source prompts fed to the adapter",
                                                  {f"retrained on {f['target']}": f["retrained"]},
                                                  errors=sds if n > 1 else None),
                         "Figure 6: one source alone vs two sources aggregated"), ref_line]
    if result.get("stores"):
        cols = get_task(task).metrics
        rows = [[f, os.path.basename(s["model"].rstrip("/")), *[s["methods"].get(c) for c in cols],
                 s.get("init_scale", "–"), s.get("init_correlation", "–"),
                 fmt(float(s["cost"].get("wall_s", float("nan"))), 1), s["cost"].get("llm_record_passes")]
                for f, s in result["stores"].items()]
        refs = next((s.get("reference") for s in result["stores"].values() if s.get("reference")), {})
        rows += [[REFERENCE_LABELS.get(n, n), "no LLM", *[m.get(c) for c in cols], "–", "–", "–", "–"]
                 for n, m in refs.items()]
        parts += ["## Family stores (each family's prompts trained from scratch by Eq. 1)",
                  "`<family>/shared` rows: one prompt for every user, trained the same way (the control: is the "
                  "personalization in the prompts or in the foundation?).",
                  "init corr.: the trained prompts' correlation with their random start (Eq. 1 starts each "
                  "prompt uniform with RMS init scale x the embedding RMS; near 1: the store is mostly its init).",
                  md_table(["family", "model", *[metric_name(c) for c in cols], "init scale", "init corr.", "wall (s)",
                            "LLM record passes"], rows)]
    return "\n\n".join(p for p in parts if p) + "\n"


def write_benchmark(result: dict, output: str, storage=None, command: str | None = None) -> str:
    """benchmark.json + benchmark.md (+ PNGs) into output; returns benchmark.md's path."""
    write_json_to(join(output, "benchmark.json"), {"format": REPORT_FORMATS["benchmark"], **result}, storage)
    writer = ReportWriter(output, storage)
    return writer.write("benchmark.md", benchmark_markdown(result, writer, command))


__all__ = ["benchmark_markdown", "write_benchmark"]
