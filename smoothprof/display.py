"""What the terminal shows: rich tables and plotext plots.

Plots are built as plain strings of a fixed width, so the same file gives the same bytes in a CI
log; colour is added only when asked, and ``ascii_only`` swaps box-drawing characters for ASCII.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence

import numpy as np
import plotext as plt
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .fit import EnvelopeFit
from .recommend import Recommendation, Recommendations, pytorch_snippet
from .trajectory import Trajectory


def _box_drawing_as_ascii() -> dict[str, str]:
    table = {}
    for code in range(0x2500, 0x2580):
        name = unicodedata.name(chr(code), "")
        horizontal, vertical = "HORIZONTAL" in name, "VERTICAL" in name
        table[chr(code)] = (
            "-" if horizontal and not vertical else "|" if vertical and not horizontal else "+"
        )
    return table


_ASCII = str.maketrans(
    {
        **_box_drawing_as_ascii(),
        "•": "*",
        "·": "*",
        "⋅": "*",
        "τ": "tau",
        "η": "eta",
        "γ": "gamma",
        "β": "beta",
        "≤": "<=",
        "≥": ">=",
        "√": "sqrt",
        "²": "^2",
        "—": "-",
        "–": "-",
        "×": "x",
        "…": "...",
        "‖": "||",
        "’": "'",
        "“": '"',
        "”": '"',
    }
)


def to_ascii(text: str) -> str:
    """Text with only ASCII characters: box drawing and symbols spelled out, the rest as '?'."""
    return text.translate(_ASCII).encode("ascii", "replace").decode("ascii")


ESTIMATOR_COLUMNS = {"hvp": "hessian_norm", "fd": "smoothness_fd"}
ESTIMATOR_LABELS = {
    "hvp": "||Hessian|| (top |eigenvalue|, Lanczos)",
    "fd": "finite difference along the update",
}


def _finish(text: str, *, color: bool, ascii_only: bool) -> str:
    if not color:
        text = plt.uncolorize(text)
    if ascii_only:
        text = to_ascii(text)
    return "\n".join(line.rstrip() for line in text.splitlines())


def _start_figure(width: int, height: int, color: bool) -> None:
    # plotext keeps one global figure, and clear_figure() clears only the active subplot:
    # select the main figure first, so nothing of an earlier plot leaks into this one.
    plt.main()
    plt.clear_figure()
    plt.limitsize(False, False)  # the width asked for, not the terminal's
    plt.plotsize(width, height)
    plt.theme("pro" if color else "clear")


def format_number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}"


def envelope_plot(
    grad_norm: np.ndarray,
    smoothness: np.ndarray,
    fit: EnvelopeFit,
    *,
    width: int = 100,
    height: int = 24,
    color: bool = False,
    ascii_only: bool = False,
    smoothness_label: str = "smoothness",
) -> str:
    """Gradient norm against smoothness on log axes, with the fitted envelope L0 + L1 g."""
    keep = np.isfinite(grad_norm) & np.isfinite(smoothness) & (grad_norm > 0) & (smoothness > 0)
    g, s = grad_norm[keep], smoothness[keep]
    _start_figure(width, height, color)
    plt.xscale("log")
    plt.yscale("log")
    if len(g):
        plt.scatter(
            g.tolist(), s.tolist(), marker="*", label="probes", color="blue+" if color else None
        )
        grid = np.geomspace(g.min(), g.max(), 60)
        envelope = fit.L0 + fit.L1 * grid
        plt.plot(
            grid.tolist(),
            envelope.tolist(),
            marker=".",
            label=f"L0 + L1 g = {fit.L0:.3g} + {fit.L1:.3g} g",
            color="red+" if color else None,
        )
    plt.title(f"{smoothness_label} against gradient norm ({fit.num_points} probes)")
    plt.xlabel("gradient norm")
    return _finish(plt.build(), color=color, ascii_only=ascii_only)


def series_plot(
    trajectory: Trajectory,
    *,
    width: int = 100,
    panel_height: int = 15,
    color: bool = False,
    ascii_only: bool = False,
) -> str:
    """Loss, gradient norm and both smoothness estimates over training steps (log y)."""
    probes, train = trajectory.probes, trajectory.train
    panels = [("loss", [("train loss", train, "loss"), ("probe loss", probes, "loss")])]
    panels.append(
        ("gradient norm", [("train", train, "grad_norm"), ("probe", probes, "grad_norm")])
    )
    panels.append(
        (
            "smoothness",
            [("||Hessian||", probes, "hessian_norm"), ("finite diff.", probes, "smoothness_fd")],
        )
    )
    palette = ["blue+", "red+"]
    figures = []
    for row, (title, series) in enumerate(panels, start=1):
        _start_figure(width, panel_height, color)
        plt.title(title)
        plt.yscale("log")
        for index, (label, columns, name) in enumerate(series):
            if name not in columns or "step" not in columns:
                continue
            steps, values = columns["step"], columns[name]
            keep = np.isfinite(values) & (values > 0)
            if not keep.any():
                continue
            steps, values = _thin(steps[keep], values[keep], width * 2)
            plt.plot(
                steps.tolist(),
                values.tolist(),
                marker="*" if columns is probes else ".",
                label=label,
                color=palette[index] if color else None,
            )
        if row == len(panels):
            plt.xlabel("step")
        figures.append(_finish(plt.build(), color=color, ascii_only=ascii_only))
    return "\n".join(figures)


def _thin(steps: np.ndarray, values: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    if len(steps) <= limit:
        return steps, values
    index = np.unique(np.linspace(0, len(steps) - 1, limit).round().astype(int))
    return steps[index], values[index]


def fit_summary(fit: EnvelopeFit, estimator: str, source_files: Sequence[str]) -> Table:
    """The fitted constants and the statistics beside them."""
    table = Table(title="(L0, L1) envelope fit", show_header=True, header_style="bold")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("meaning")

    def interval(bounds: tuple[float, float] | None) -> str:
        if bounds is None:
            return ""
        return f" [{format_number(bounds[0])}, {format_number(bounds[1])}]"

    level = f"{fit.confidence:.0%} bootstrap interval" if fit.L0_interval else ""
    table.add_row("L0", format_number(fit.L0) + interval(fit.L0_interval), level)
    table.add_row("L1", format_number(fit.L1) + interval(fit.L1_interval), level)
    table.add_row("points", str(fit.num_points), f"{fit.num_dropped} dropped (non-finite or <= 0)")
    table.add_row("under envelope", f"{fit.share_below:.1%}", f"quantile fit at {fit.quantile:g}")
    table.add_row(
        "Spearman log-log",
        format_number(fit.spearman_log, 3),
        "correlation of log smoothness with log gradient norm",
    )
    table.add_row("Pearson log-log", format_number(fit.pearson_log, 3), "")
    table.add_row("L_max", format_number(fit.L_max), "largest measured smoothness")
    table.add_row("G_max", format_number(fit.G_max), "largest measured gradient norm")
    table.caption = Text(
        f"smoothness: {ESTIMATOR_LABELS[estimator]}; file(s): {', '.join(source_files)}"
    )
    return table


def recommendations_view(recs: Recommendations) -> Group:
    """Every supported rule, then the headline as ready-to-paste PyTorch."""
    table = Table(title="Suggested clip threshold and step size", header_style="bold")
    table.add_column("rule")
    table.add_column("clip c", justify="right")
    table.add_column("step size", justify="right")
    table.add_column("source")
    for rec in recs.rules:
        marker = " (headline)" if rec.rule == recs.headline.rule else ""
        table.add_row(
            Text(rec.title + marker),
            "none" if rec.clip_threshold is None else format_number(rec.clip_threshold),
            step_size_text(rec),
            Text(rec.source),
        )
    table.caption = "step sizes written a/(g + b) scale with the gradient norm g of each step"
    lines = [Text(recs.explanation)]
    lines += [Text(f"warning: {w}", style="yellow") for w in recs.warnings]
    snippet = Panel(
        Text(pytorch_snippet(recs.headline)),
        title=f"headline: {recs.headline.title}",
        expand=False,
    )
    return Group(table, *lines, snippet)


def step_size_text(rec: Recommendation) -> str:
    """The step size of a rule; an adaptive one as ``a/(g + b)``."""
    if rec.step_offset is None:
        return format_number(rec.step_size)
    return f"{format_number(rec.step_size)}/(g + {format_number(rec.step_offset)})"


def probe_line(record) -> str:
    """One probe as a short status string for the progress display."""
    parts = [f"probe@{record.step}", f"|g| {format_number(record.grad_norm, 3)}"]
    if math.isfinite(record.smoothness_fd):
        parts.append(f"L_fd {format_number(record.smoothness_fd, 3)}")
    if math.isfinite(record.hessian_norm):
        mark = "" if record.hessian_converged else "?"
        parts.append(f"|H| {format_number(record.hessian_norm, 3)}{mark}")
    return " ".join(parts)
