"""Reports a person reads: report.md beside report.json, with PNG plots, for migrate, sweep and benchmark runs.

Core module (no Ray). Plots use matplotlib's object API on the Agg canvas (`Figure` + `FigureCanvasAgg`), never
pyplot: no global figure state, no display needed, safe in worker threads. Every plot function takes plain
dicts/lists and returns PNG bytes; the `write_*` functions write the PNGs and the Markdown through fsspec, so an
`s3://` run folder gets its report beside its report.json like a local one.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from puma_ray.fs import is_remote
from puma_ray.reports.common import DPI, ReportWriter, fmt, md_table, new_figure, png_bytes
from puma_ray.reports.gate import gate_markdown, read_gate_table
from puma_ray.tasks import get_task

# Row order and names of the paper's Table 2 (methods a report may lack are skipped; unknown ones go last)
METHOD_ORDER = ("puma", "puma_all_users", "puma_budget", "linear", "shipped", "random_init", "source", "full_retrain",
                "shared_prompt")
METHOD_LABELS = {"puma": "PUMA", "linear": "linear map", "random_init": "random init", "source": "source model",
                 "full_retrain": "full retraining", "shared_prompt": "one shared prompt (target)",
                 # the benchmark's rows: what `ship` chose per seed, and Table 2 in the paper's protocol
                 "shipped": "shipped adapter (chosen on validation)", "puma_all_users": "PUMA fitted on every user",
                 "puma_budget": "PUMA at the budget (Table 2's runs)"}
# The reference rows (puma_ray/training/reference.py): LLM-free predictors on the same records, in every quality table
REFERENCE_LABELS = {"global_mean": "global mean (no LLM)", "user_mean": "per-user mean (no LLM)",
                    "bias": "user + item bias (no LLM)"}
LOWER_IS_BETTER = {"rmse": True, "mae": True, "auc": False, "uauc": False}
# Axis labels with units: ratings are in stars (1..5); AUCs are probabilities, unitless
METRIC_AXIS = {"rmse": "RMSE (stars, lower is better)", "mae": "MAE (stars, lower is better)",
               "auc": "AUC (higher is better)", "uauc": "uAUC (higher is better)"}
METRIC_NAMES = {"rmse": "RMSE", "mae": "MAE", "auc": "AUC", "uauc": "uAUC"}


# ---------------------------------------------------------------------------------------------- formatting
def method_label(name: str) -> str:
    if name.startswith("source_"):  # further sources of an aggregated migration: source_1, source_2, ...
        return f"source model {int(name.split('_')[1]) + 1}"
    if name.startswith("adapter_"):  # baselines.candidates: adapter_mlp_32 is the spec "mlp:32"
        kind, _, hidden = name[len("adapter_"):].rpartition("_") if name[-1].isdigit() else (name[8:], "", "")
        return f"adapter {kind}" + (f" (hidden {hidden})" if hidden else "")
    return METHOD_LABELS.get(name, name)


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def ordered_methods(names) -> list[str]:
    names = list(names)
    known = [m for m in METHOD_ORDER if m in names]
    return known + [n for n in names if n not in known]


def best_value(values: list[float], metric: str) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return None
    return min(finite) if LOWER_IS_BETTER.get(metric, True) else max(finite)


def metrics_table(methods: dict, task: str, reference: dict | None = None) -> str:
    """Table 2: one row per method, then the reference rows (no LLM) on the same records, the task's two metrics;
    the best of each column in bold, references included: a reader sees at once whether the LLM personalizes."""
    cols = get_task(task).metrics
    rows_in = [(method_label(n), methods[n]) for n in ordered_methods(methods)]
    rows_in += [(REFERENCE_LABELS.get(n, n), m) for n, m in (reference or {}).items()]
    best = {c: best_value([m.get(c) for _, m in rows_in], c) for c in cols}
    rows = []
    for label, m in rows_in:
        cells = []
        for c in cols:
            v = m.get(c)
            cells.append(f"**{fmt(v)}**" if v is not None and v == best[c] else fmt(v))
        rows.append([label, *cells])
    arrows = [f"{metric_name(c)} {'↓' if LOWER_IS_BETTER[c] else '↑'}" for c in cols]
    return md_table(["method", *arrows], rows)


def cost_table(cost: dict, ratio: dict | None = None) -> str:
    """Table 3: what each fitted method spent; `ratio` (full retraining / PUMA) as a last line when known."""
    rows = [[method_label(n), fmt(float(c.get("wall_s", 0.0)), 1), fmt(float(c.get("startup_s", 0.0)), 1),
             fmt(int(c.get("llm_record_passes", 0))), fmt(float(c.get("flops", 0.0)))]
            for n, c in ((n, cost[n]) for n in ordered_methods(cost))]
    # start-up (Ray Train placing workers and loading the model) apart: the ratio that matters at scale is work's
    text = md_table(["method", "wall (s)", "of which start-up (s)", "LLM record passes", "FLOPs (est.)"], rows)
    if ratio:
        parts = {"wall_s": "wall time", "work_s": "wall time without start-up", "llm_record_passes":
                 "LLM record passes", "flops": "FLOPs"}
        text += "\n\nFull retraining / PUMA: " + ", ".join(
            f"{parts.get(k, k)} **{v:.1f}x**" for k, v in ratio.items())
    return text


def kv_table(data: dict) -> str:
    """Two-column table of a dict: scalars as cells, short non-empty nested values as JSON (the rest is left to
    report.json)."""
    rows = []
    for k, v in data.items():
        if isinstance(v, float):
            rows.append([k, fmt(v, 2)])
        elif isinstance(v, (int, str, bool)) or v is None:
            rows.append([k, v])
        elif v and len(json.dumps(v, default=str)) <= 80:
            rows.append([k, f"`{json.dumps(v, default=str)}`"])
    return md_table(["", "value"], rows)


def _model_line(m: dict) -> str:
    return f"`{m.get('name')}` ({m.get('family')}, d={m.get('hidden_size')})"


def _link(path: str, out_dir: str) -> str:
    """A relative Markdown link when `path` lies inside the run folder (it travels with it), else the path."""
    if path and not is_remote(path) and not is_remote(out_dir):
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir))
        if not rel.startswith(".."):
            return f"[`{path}`]({rel}/)"
    return f"`{path}`"


# ---------------------------------------------------------------------------------------------- plots
def _zoom_limits(values: list[float], room_above: float = 0.4) -> tuple[float, float] | None:
    """Bars whose values sit close together (RMSE 1.18 vs 1.21) are unreadable from zero: axis limits near the
    values instead, or None when the bars are readable from zero."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return None
    lo, hi = min(finite), max(finite)
    span = max(hi - lo, 1e-3)
    return (max(0.0, lo - 0.6 * span), hi + room_above * span) if lo > 3 * span else None


def _zoom_bars(ax, values: list[float], metric: str) -> None:
    """Vertical bars: zoomed y axis when it helps, and the axis label says so."""
    limits = _zoom_limits(values)
    ax.set_ylabel(METRIC_AXIS.get(metric, metric) + (" — axis not from 0" if limits else ""))
    if limits:
        ax.set_ylim(*limits)


def _label_bars(ax, bars, digits: int = 4) -> None:
    ax.bar_label(bars, labels=[f"{b.get_height():.{digits}f}" for b in bars], fontsize=7, padding=2)


def plot_metric_bars(methods: dict, metrics: tuple[str, ...], title: str) -> bytes:
    """One panel per metric, one horizontal bar per method (names read horizontally, never rotated), each bar
    labelled with its value, the best one highlighted; each panel's axis zoomed to where the values differ."""
    names = ordered_methods(methods)[::-1]  # barh draws bottom-up: keep the table's order top-down
    fig = Figure(figsize=(3.2 + 2.6 * len(metrics), max(2.8, 1.2 + 0.45 * len(names))), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    for ax, m in zip(axes, metrics):
        vals = [float(methods[n].get(m, float("nan"))) for n in names]
        best = best_value(vals, m)
        colors = ["tab:green" if v == best else "tab:blue" for v in vals]
        bars = ax.barh(range(len(names)), vals, 0.6, color=colors)
        ax.bar_label(bars, labels=[f"{v:.4f}" for v in vals], fontsize=8, padding=2)
        limits = _zoom_limits(vals, room_above=0.7)  # room on the right for the value labels
        if limits:
            ax.set_xlim(*limits)
        ax.set_xlabel(METRIC_AXIS.get(m, m) + ("\n(axis not from 0)" if limits else ""), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), [method_label(n) for n in names])
    axes[0].set_ylabel("method")
    handles = [Rectangle((0, 0), 1, 1, color="tab:green"), Rectangle((0, 0), 1, 1, color="tab:blue")]
    fig.legend(handles, ["best of the column", "other methods"], loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(title)
    return png_bytes(fig)


def plot_fit_history(history: list[dict], metric: str, best_epoch: int | None = None,
                     title: str = "PUMA adapter fit") -> bytes:
    """Validation metric per epoch (left axis) and the mean training loss (right axis); best epoch marked."""
    epochs = [h["epoch"] for h in history]
    fig, ax = new_figure()
    valid = [h.get(f"valid_{metric}", float("nan")) for h in history]
    lines = ax.plot(epochs, valid, "o-", color="tab:blue", label=f"validation {metric_name(metric)}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {METRIC_AXIS.get(metric, metric)}")
    if all("train_loss" in h for h in history):
        right = ax.twinx()
        lines += right.plot(epochs, [h["train_loss"] for h in history], "s--", color="tab:orange",
                            label="training loss")
        right.set_ylabel("mean training loss (task loss, unitless)")
    if best_epoch is not None and best_epoch in epochs:
        best = valid[epochs.index(best_epoch)]
        lines += ax.plot([best_epoch], [best], "*", color="tab:red", markersize=14,
                         label=f"kept: epoch {best_epoch} ({best:.4f})")
    ax.set_xticks(epochs)
    ax.legend(lines, [ln.get_label() for ln in lines], loc="best", fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def plot_quality_vs_budget(series: dict[str, list[tuple[float, float]]], metric: str,
                           references: dict[str, float] | None = None, budget_label: str = "budget (users)",
                           title: str = "Quality vs budget") -> bytes:
    """Figure 3 / Table 4: one line per strategy over budgets; `references` (e.g. full retraining) as dashed
    horizontal lines."""
    fig, ax = new_figure()
    for name, points in series.items():
        pts = sorted(points)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    for j, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, linestyle="--", color=f"C{len(series) + j}", label=f"{name} ({value:.4f})")
    ax.set_xlabel(budget_label)
    ax.set_ylabel(METRIC_AXIS.get(metric, metric))
    ax.set_title(title)
    ax.margins(0.06)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def plot_pareto(points: list[dict], front: list[dict], recommended: dict | None, metric: str,
                title: str = "Sweep: cost vs validation quality") -> bytes:
    """Every trial as a point (cost, quality), the Pareto front as a step line, the recommended trial starred.
    points/front/recommended: dicts with "cost" (LLM record passes) and "quality"."""
    fig, ax = new_figure()
    ax.scatter([p["cost"] for p in points], [p["quality"] for p in points], color="tab:gray", alpha=0.7,
               label=f"trials ({len(points)})")
    front = sorted(front, key=lambda p: p["cost"])
    if front:
        ax.plot([p["cost"] for p in front], [p["quality"] for p in front], "o-", color="tab:blue",
                drawstyle="steps-post", label="Pareto front")
    if recommended:
        ax.plot([recommended["cost"]], [recommended["quality"]], "*", color="tab:red", markersize=16,
                label="recommended")
    costs = [p["cost"] for p in points if p["cost"] > 0]
    if costs and max(costs) / min(costs) > 20:  # a wide range of costs is unreadable on a linear axis
        ax.set_xscale("log")
    ax.set_xlabel("cost (LLM record passes" + (", log scale)" if ax.get_xscale() == "log" else ")"))
    ax.set_ylabel(f"validation {METRIC_AXIS.get(metric, metric)}")
    ax.set_title(title)
    ax.margins(0.08)  # points on the front's ends are not cut by the frame
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)  # below the axes: never over the front
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def plot_gain_heatmap(families: list[str], gains: dict[str, dict[str, float]],
                      title: str = "Cross-model gain (full-retrained RMSE / migrated RMSE)",
                      colorbar_label: str = "gain (> 1: migration beats retraining)") -> bytes:
    """Figure 4: rows = source family, columns = target family, each cell annotated; missing cells (the
    diagonal) are blank."""
    n = len(families)
    grid = np.full((n, n), np.nan)
    for i, s in enumerate(families):
        for j, t in enumerate(families):
            grid[i, j] = gains.get(s, {}).get(t, np.nan)
    fig, ax = new_figure((max(5.0, 1.6 + 1.3 * n), max(3.8, 1.2 + 1.1 * n)))  # room for title + colorbar
    finite = grid[np.isfinite(grid)]
    spread = max(abs(finite - 1).max(), 0.01) if finite.size else 0.1
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=1 - spread, vmax=1 + spread)
    for i in range(n):
        for j in range(n):
            strong = np.isfinite(grid[i, j]) and abs(grid[i, j] - 1) > 0.6 * spread  # dark cell: white text
            ax.text(j, i, "–" if np.isnan(grid[i, j]) else f"{grid[i, j]:.3f}", ha="center", va="center",
                    fontsize=9, color="white" if strong else "black")
    ax.set_xticks(range(n), families)
    ax.set_yticks(range(n), families)
    ax.set_xlabel("target model family")
    ax.set_ylabel("source model family")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=colorbar_label, shrink=0.8)
    return png_bytes(fig)


def plot_chain(steps: list[dict], metric: str, title: str = "Chain migration") -> bytes:
    """Figure 5: steps = [{"model": name, "migrated": value, "sd": spread over seeds or None, "retrained": value
    or None}] in chain order; bars for the migrated prompts on each model (error bars: the sd), a line for
    retraining that model from scratch."""
    fig, ax = new_figure()
    x = np.arange(len(steps))
    migrated = [s["migrated"] for s in steps]
    sd = [s.get("sd") or 0.0 for s in steps]
    _label_bars(ax, ax.bar(x, migrated, 0.55, color="tab:blue", label="prompts migrated along the chain",
                           yerr=sd if any(sd) else None, capsize=4))
    retrained = [s.get("retrained") for s in steps]
    values = [*migrated, *(m + e for m, e in zip(migrated, sd)), *(m - e for m, e in zip(migrated, sd))]
    if any(r is not None for r in retrained):
        r = [np.nan if v is None else v for v in retrained]
        ax.plot(x, r, "D--", color="tab:orange", label="retrained from scratch on that model")
        values += [v for v in r if not np.isnan(v)]
    _zoom_bars(ax, values, metric)
    ax.set_xticks(x, [s["model"] for s in steps])
    ax.set_xlabel("model at each step (left to right: the chain's order)")
    ax.set_title(title)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)  # below the axes: never over a bar
    ax.grid(axis="y", alpha=0.3)
    return png_bytes(fig)


def plot_bars(values: dict[str, float], metric: str, title: str, xlabel: str,
              references: dict[str, float] | None = None, errors: dict[str, float] | None = None) -> bytes:
    """Figure 6 (aggregation: source A alone, B alone, A+B) and any labelled bars with reference lines; errors:
    each bar's spread over seeds (drawn as error bars)."""
    fig, ax = new_figure()
    names = list(values)
    yerr = [(errors or {}).get(n, 0.0) for n in names] if errors else None
    _label_bars(ax, ax.bar(range(len(names)), [values[n] for n in names], 0.55,
                           color=[f"C{i}" for i in range(len(names))], yerr=yerr, capsize=4))
    for j, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, linestyle="--", color="0.3" if j == 0 else f"C{len(names) + j}",
                   label=f"{name} ({value:.4f})")
    tops = [values[n] + e for n, e in zip(names, yerr)] if yerr else []
    bottoms = [values[n] - e for n, e in zip(names, yerr)] if yerr else []
    _zoom_bars(ax, [*values.values(), *tops, *bottoms, *(references or {}).values()], metric)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    if references:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return png_bytes(fig)


# ---------------------------------------------------------------------------------------------- writing
def _choice(choice: dict | None) -> str:
    """Which fitted adapter converted everyone, and by which validation figures."""
    if not choice:
        return ""
    figures = ", ".join(f"{method_label(n)} {fmt(v)}" for n, v in choice["validation"].items())
    return (f" ({method_label(choice['shipped'])}, shipped by rule `{choice['rule']}`; validation "
            f"{metric_name(choice['metric'])}: {figures})")


def _header(report: dict, out_dir: str) -> list[str]:
    sources = report.get("sources") or [report["source"]]
    sel, data = report.get("selection", {}), report.get("data", {})
    records = data.get("records", {})
    prov = report.get("provenance", {})
    lines = [
        "# Migration report", "",
        f"- **task**: {report['task']} (primary metric {metric_name(report.get('primary_metric', '?'))})",
        f"- **migration**: {' + '.join(_model_line(s) for s in sources)} → {_model_line(report['target'])}",
        f"- **data**: {data.get('name', '?')}: {fmt(data.get('users'))} users, {fmt(data.get('items'))} items, "
        f"records train/valid/test {'/'.join(fmt(records.get(k)) for k in ('train', 'valid', 'test'))}",
        f"- **selection**: `{sel.get('strategy')}`, K={sel.get('k')}, budget {fmt(sel.get('budget'))}: "
        f"{fmt(sel.get('users_selected'))} of {fmt(sel.get('users_total'))} users fitted on, "
        f"{fmt(sel.get('validation_users'))} validation users",
        f"- **wall time**: {fmt(float(report.get('wall_s', float('nan'))), 1)} s",
        f"- **made by**: {prov.get('package', '?')} (torch {prov.get('torch', '?')}, {prov.get('host', '?')}, "
        f"{prov.get('created_at', '?')})",
        f"- **target store**: {_link(report.get('store', ''), out_dir)}",
        f"- **adapter**: {_link(report.get('adapter', ''), out_dir)}" + _choice(report.get("adapter_choice")),
        "- **full record**: [report.json](report.json)",
    ]
    for folder, card in (report.get("foundations") or {}).items():
        data = card.get("data", {})
        lines.append(f"- **foundation** `{os.path.basename(folder)}`: {card.get('family')} "
                     f"d={card.get('hidden_size')}, "
                     f"{card.get('layers')} layers, seed {card.get('seed')}, pretrained on the {data.get('split')} "
                     f"split of {data.get('name')} ({fmt(data.get('records'))} records) in "
                     f"{fmt(float(card.get('wall_s') or 0), 1)} s, final loss {fmt(card.get('final_epoch_loss'))}")
    return lines


def migration_markdown(report: dict, out_dir: str, writer: ReportWriter | None = None, storage=None) -> str:
    """The report's Markdown; with a writer, its PNGs are written too and linked."""
    task = report["task"]
    metric = report.get("primary_metric", get_task(task).primary)
    parts = ["\n".join(_header(report, out_dir)), "## Quality (test split of all users)",
             metrics_table(report["methods"], task, report.get("reference"))]
    if writer:
        names = " / ".join(map(metric_name, get_task(task).metrics))
        png = plot_metric_bars(report["methods"], get_task(task).metrics, f"Test {names} per method")
        parts.append(writer.figure("metrics.png", png, "Test metrics per method (the numbers of the table above)"))
    if report.get("cost"):
        parts += ["## Cost", cost_table(report["cost"], report.get("cost_ratio_full_retrain_over_puma")),
                  "PUMA's row includes computing the selection statistics; LLM record passes count every record "
                  "through the frozen LLM, forward and backward separately."]
    if report.get("conversion"):
        parts += ["## Conversion (every user → the target store)", kv_table(report["conversion"])]
    gate = report.get("gate") or {}
    if "users" in gate:  # the gate ran (a skipped one says why in report.json)
        parts += gate_markdown(gate, writer, read_gate_table(gate["table"], storage) if writer else None)
    puma_fit = report.get("fits", {}).get("puma")
    if writer and puma_fit and puma_fit.get("history"):
        png = plot_fit_history(puma_fit["history"], metric, puma_fit.get("best_epoch"))
        parts += ["## PUMA adapter fit", writer.figure(
            "puma_fit.png", png, f"Validation {metric_name(metric)} and training loss per epoch of the PUMA fit")]
    return "\n\n".join(parts) + "\n"


def write_migration_report(report: dict, out_dir: str, storage=None) -> str:
    """Writes report.md (+ metrics.png, puma_fit.png) into out_dir beside report.json; returns report.md's path."""
    writer = ReportWriter(out_dir, storage)
    return writer.write("report.md", migration_markdown(report, out_dir, writer, storage))


# ---------------------------------------------------------------------------------------------- sweep
def _trial_cost(trial: dict) -> float:
    return float(trial.get("cost", {}).get("llm_record_passes", 0))


def _pareto_trials(report: dict) -> list[dict]:
    """The front as trial dicts, whether the report lists indices into trials or the trials themselves."""
    trials = report["trials"]
    return [trials[p] if isinstance(p, int) else p for p in report.get("pareto", [])]


def _same_trial(a: dict, b: dict | None) -> bool:
    return bool(b) and a.get("config") == b.get("config") and a.get("quality") == b.get("quality")


def _quality_cell(t: dict) -> str:
    """A setting's validation figure: its mean ± sd over seeds when it ran on several."""
    if len(t.get("seeds") or []) > 1:
        return f"{fmt(t['quality'])} ± {fmt(t['quality_sd'])} ({len(t['seeds'])} seeds)"
    return fmt(t["quality"])


def sweep_markdown(report: dict, writer: ReportWriter | None = None) -> str:
    trials = report["trials"]
    settings = report.get("settings") or trials  # several seeds: one row per setting, its mean over them
    metric = trials[0]["metric"] if trials else "rmse"
    lower = LOWER_IS_BETTER.get(metric, True)
    front, rec = _pareto_trials(report), report.get("recommended")
    ranked = sorted(settings, key=lambda t: t["quality"] if lower else -t["quality"])
    rows = []
    for rank, t in enumerate(ranked, 1):
        c = t.get("config", {})
        marks = ("Pareto" if any(_same_trial(t, p) for p in front) else "")
        marks += " **recommended**" if _same_trial(t, rec) else ""
        rows.append([rank, c.get("strategy"), c.get("k"), c.get("budget"), _lr(c.get("lr")),
                     c.get("adapter") or "the config's", _quality_cell(t),
                     int(t.get("cost", {}).get("llm_record_passes", 0)),
                     fmt(float(t.get("cost", {}).get("wall_s", 0.0)), 1), marks.strip()])
    parts = ["# Sweep report",
             f"{len(trials)} trials ({len(settings)} settings); validation {metric_name(metric)} "
             f"({'lower' if lower else 'higher'} is better); tolerance {report.get('tolerance')}. "
             "Full record: [report.json](report.json)."]
    if rec:
        rc = rec.get("config", {})
        parts.append(f"**Recommended** (the cheapest setting within tolerance of the best): strategy "
                     f"`{rc.get('strategy')}`, K={rc.get('k')}, budget {rc.get('budget')}, lr {_lr(rc.get('lr'))}, "
                     f"adapter `{rc.get('adapter') or 'the config'}`: {metric_name(metric)} {_quality_cell(rec)} at "
                     f"{fmt(int(_trial_cost(rec)))} LLM record passes.")
    if report.get("reference"):
        # the recommended trial as the first row: the best of each column in bold, over it and the references
        recommended = {"recommended trial": rec["valid_metrics"]} if rec and rec.get("valid_metrics") else {}
        parts += ["## Beside the reference rows (no LLM, fitted on the train split, the same validation records)",
                  metrics_table(recommended, "ctr" if metric in ("auc", "uauc") else "rating", report["reference"])]
        user_mean = (report.get("recommended_vs_reference") or {}).get("user_mean")
        if rec and user_mean:
            parts.append(f"The recommended trial ({metric_name(metric)} {fmt(rec.get('quality'))}) "
                         + ("beats" if user_mean["beaten"] else "does **not** beat")
                         + f" the per-user mean ({fmt(user_mean[metric])}) on these records.")
    parts += ["## Trials (best first)", md_table(
        ["rank", "strategy", "K", "budget", "lr", "adapter", f"valid {metric_name(metric)}", "LLM record passes",
         "wall (s)", ""],
        rows)]
    if writer and trials:
        as_point = lambda t: {"cost": _trial_cost(t), "quality": t["quality"]}  # noqa: E731
        png = plot_pareto([as_point(t) for t in trials], [as_point(t) for t in front],
                          as_point(rec) if rec else None, metric)
        parts += ["## Pareto front", writer.figure("pareto.png", png, "Cost vs validation quality of every trial")]
        series = quality_by_budget(trials, lower)
        budgets = [b for pts in series.values() for b, _ in pts]
        label = "budget (fraction of users)" if budgets and max(budgets) <= 1 else "budget (users)"
        png = plot_quality_vs_budget(series, metric, budget_label=label,
                                     title="Validation quality vs budget (best lr / K per point)")
        parts += ["## Quality vs budget", writer.figure("quality_vs_budget.png", png,
                                                        "Best validation quality at each budget, per strategy")]
    return "\n\n".join(parts) + "\n"


def _lr(lr) -> str:
    return f"{lr:.3g}" if isinstance(lr, float) else fmt(lr)  # 1e-4 stays readable (not 0.0001 or 0.0000)


def quality_by_budget(trials: list[dict], lower: bool = True) -> dict[str, list[tuple[float, float]]]:
    """strategy → [(budget, best quality at that budget)]: other knobs (lr, K) are maximised over. The budget is
    the number of users selected where the trial says it (a fractional budget resolved), else the config's."""
    best: dict[tuple, float] = {}
    for t in trials:
        key = (t["config"]["strategy"], float(t.get("users_selected", t["config"]["budget"])))
        q = t["quality"]
        if key not in best or (q < best[key] if lower else q > best[key]):
            best[key] = q
    series: dict[str, list] = {}
    for (strategy, budget), q in sorted(best.items()):
        series.setdefault(strategy, []).append((budget, q))
    return series


def write_sweep_report(report: dict, out_dir: str, storage=None) -> str:
    """Writes report.md (+ pareto.png, quality_vs_budget.png) into out_dir; returns report.md's path."""
    writer = ReportWriter(out_dir, storage)
    return writer.write("report.md", sweep_markdown(report, writer))
