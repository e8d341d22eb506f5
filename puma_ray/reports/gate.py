"""The per-user gate in a run folder: the queryable table (Parquet), its plot and its report section.

Core module (no Ray). The table is one row per user (records, old and new mean validation loss, their difference,
t, one-sided p-values, verdict): `pyarrow.parquet.read_table(<run>/gate/users.parquet)` or DuckDB/pandas query it.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from puma_ray.artifacts.formats import GATE_PLOT, GATE_TABLE
from puma_ray.fs import filesystem, join, write_file
from puma_ray.reports.common import ReportWriter, fmt, md_table, new_figure, png_bytes

VERDICT_COLORS = {"worse": "C3", "unchanged": "0.6", "better": "C2"}


def write_gate_table(table: pd.DataFrame, out_dir: str, storage=None) -> str:
    """users.parquet under the run folder (atomic like every file we write); returns its path."""
    fs, root = filesystem(out_dir, storage)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), buf)
    path = join(root, GATE_TABLE)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # a no-op on object stores
    write_file(fs, path, buf.getvalue())
    return join(out_dir, GATE_TABLE)


def read_gate_table(path: str, storage=None) -> pd.DataFrame:
    """The table write_gate_table wrote (the report's plot is drawn from it)."""
    fs, root = filesystem(path, storage)
    with fs.open(root, "rb") as f:
        return pq.read_table(f).to_pandas()


def plot_gate(table: pd.DataFrame, loss: str) -> bytes:
    """Histogram of each user's mean loss change (new - old), stacked by verdict: who got worse, by how much."""
    fig, ax = new_figure()
    diff = table["diff"].to_numpy()
    lo, hi = (np.quantile(diff, 0.005), np.quantile(diff, 0.995)) if len(diff) else (-1.0, 1.0)
    bins = np.linspace(min(lo, -1e-6), max(hi, 1e-6), 41)
    groups = [(v, np.clip(table.loc[table["verdict"] == v, "diff"].to_numpy(), bins[0], bins[-1]))
              for v in VERDICT_COLORS]
    ax.hist([g for _, g in groups], bins=bins, stacked=True, color=[VERDICT_COLORS[v] for v, _ in groups],
            label=[f"{v} ({len(g):,})" for v, g in groups])
    ax.axvline(0.0, color="0.2", linewidth=0.8)
    ax.set_xlabel(f"new - old mean validation {loss} per user (right of 0: worse on the new system)")
    ax.set_ylabel("users")
    ax.set_title("Per-user gate: each user's new system against their old one")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return png_bytes(fig)


def gate_markdown(gate: dict, writer: ReportWriter | None, table: pd.DataFrame | None = None) -> list[str]:
    """The report's gate section: the rule, the counts, the worst users, the plot when the table is at hand."""
    rule = gate["rule"]
    parts = ["## Per-user gate (validation records: old system against the new)",
             f"Rule: {rule['test']}, alpha {rule['alpha']}, margin {rule['margin']}, users with fewer than "
             f"{rule['min_records']} records count as unchanged. Table: `{gate.get('table', '?')}`.",
             md_table(["users", "worse", "better", "unchanged", "share worse", "too few records"],
                      [[gate["users"], gate["worse"], gate["better"], gate["unchanged"],
                        fmt(gate["share_worse"]), gate["too_few_records"]]])]
    full = gate.get("full_retrain")
    if full:  # the same rule on full retraining's store: the share of users retraining itself makes worse
        parts.append(f"Full retraining on the same rule: {full['worse']} of {full['users']} users worse "
                     f"({fmt(full['share_worse'])}), {full['better']} better.")
    if gate.get("worst_users"):
        parts.append(md_table(["worst users", "records", "old loss", "new loss", "p"],
                              [[f"`{u['user_id']}`", u["records"], fmt(u["old_loss"]), fmt(u["new_loss"]),
                                f"{u['p']:.2g}"] for u in gate["worst_users"]]))
    if writer is not None and table is not None and len(table):
        parts.append(writer.figure(GATE_PLOT, plot_gate(table, gate.get("loss", "loss")),
                                   "Each user's change of mean validation loss, by verdict"))
    return parts
