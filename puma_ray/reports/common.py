"""What every report module shares: table cells, Markdown tables, Agg figures as PNG bytes, and the writer that puts
them into a run folder (local or s3://). Core module (no Ray); matplotlib's object API only, never pyplot."""
from __future__ import annotations

import io
import math
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from puma_ray.fs import filesystem, is_remote, join, write_file

DPI = 110  # ~700 px wide at the default sizes below: sharp on screen, small in git (tens of kB)
FIGSIZE = (6.4, 4.0)


def fmt(value, digits: int = 4) -> str:
    """A table cell: floats to `digits` decimals, big counts with thousands separators, FLOP counts in e-notation."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1e7:
            return f"{value:.2e}"
        return f"{value:,.{min(digits, 1)}f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def md_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table; cells already strings are kept as they are."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def new_figure(figsize=FIGSIZE) -> tuple[Figure, object]:
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")  # constrained: labels never overlap or clip
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


class ReportWriter:
    """Writes files into one run folder (local or s3://) and remembers the PNGs, for links in the Markdown."""

    def __init__(self, out_dir: str, storage=None):
        self.out_dir = out_dir
        self.fs, self.root = filesystem(out_dir, storage)
        if not is_remote(out_dir):
            os.makedirs(out_dir, exist_ok=True)

    def write(self, name: str, data: bytes | str) -> str:
        write_file(self.fs, join(self.root, name), data.encode() if isinstance(data, str) else data)
        return join(self.out_dir, name)

    def figure(self, name: str, png: bytes, caption: str) -> str:
        """Writes the PNG; returns its Markdown (image + caption), linked relative to report.md."""
        self.write(name, png)
        return f"![{caption}]({name})\n\n*{caption}* ([{name}]({name}))"
