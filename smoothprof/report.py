"""Figures of one run as PNG files and one self-contained HTML page (``smoothprof report``).

The paper's Figure 1 (Zhang et al. 2020: gradient norm against local smoothness on log axes,
coloured by iteration) with the fitted envelope L0 + L1 g, and the series over the steps (loss,
gradient norm, smoothness, step size, share of clipped steps). matplotlib is an optional
dependency (``pip install "smoothprof[science]"``): it is imported only when a report is drawn,
and its object-oriented API with the Agg canvas is used directly, so drawing a report changes no
global matplotlib state (no pyplot, no backend switch) in the caller's process. The HTML page
inlines its images as base64 data URIs and its style sheet, and links to nothing: it can be
mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .display import (
    ESTIMATOR_LABELS,
    SHARPNESS_LABELS,
    assumptions_text,
    clipped_share_window,
    fit_rows,
    format_number,
    profile_sweep_commands,
    rolling_share,
    step_size_text,
)
from .fit import EnvelopeFit
from .per_layer import PerLayerAnalysis
from .recommend import Recommendations, pytorch_snippet
from .stability import edge_of_stability
from .trajectory import Trajectory
from .wording import plural

MISSING_MATPLOTLIB = (
    "smoothprof report needs matplotlib, an optional extra: pip install 'smoothprof[science]'"
)
SMOOTHNESS_PNG = "smoothness.png"
SERIES_PNG = "series.png"
PER_LAYER_PNG = "per_layer.png"  # a per-layer run's report only
REPORT_HTML = "report.html"
DPI = 120


class ReportError(Exception):
    """The report cannot be drawn or written; the message is one line."""


@dataclass(frozen=True)
class ReportFiles:
    """The files a report wrote."""

    smoothness_png: Path  # Figure 1: gradient norm against smoothness, with the envelope
    series_png: Path  # the series over the steps
    html: Path  # one page with both figures inlined, the fit and the recommendations
    per_layer_png: Path | None = None  # a per-layer run: each group's sharpness and envelope


def require_matplotlib() -> Any:
    """The ``matplotlib`` module, or ReportError naming the extra to install."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise ReportError(MISSING_MATPLOTLIB) from None
    return matplotlib


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas: rendering needs no display and no pyplot
    return figure


def _plain_log_ticks(axis: Any) -> None:
    """Tick labels 0.5, 2, 20 on a log axis instead of 5x10^-1, 2x10^0, 2x10^1 (on the ticks
    matplotlib would label)."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:.3g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(Plain(labelOnlyBase=False))
    axis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _png_bytes(figure: Any) -> bytes:
    buffer = io.BytesIO()
    # No timestamp in the file: the same trajectory gives the same bytes.
    figure.savefig(buffer, format="png", metadata={"Software": f"smoothprof {__version__}"})
    return buffer.getvalue()


def _positive_finite(*columns: np.ndarray) -> np.ndarray:
    keep = np.ones(len(columns[0]), dtype=bool)
    with np.errstate(invalid="ignore"):
        for column in columns:
            keep &= np.isfinite(column) & (column > 0)
    return keep


def smoothness_figure(
    grad_norm: np.ndarray,
    smoothness: np.ndarray,
    steps: np.ndarray,
    fit: EnvelopeFit,
    *,
    smoothness_label: str = "smoothness",
    title: str = "",
) -> Any:
    """The paper's Figure 1: smoothness against gradient norm on log axes, each probe coloured
    by its training step (colorbar), and the envelope L0 + L1 g over the measured range."""
    grad_norm = np.asarray(grad_norm, dtype=np.float64)
    smoothness = np.asarray(smoothness, dtype=np.float64)
    steps = np.asarray(steps, dtype=np.float64)
    keep = _positive_finite(grad_norm, smoothness)
    g, s, t = grad_norm[keep], smoothness[keep], steps[keep]
    figure = _new_figure(6.4, 4.8)
    axes = figure.add_subplot()
    if len(g):
        points = axes.scatter(
            g, s, c=t, cmap="viridis", s=28, edgecolors="black", linewidths=0.3, zorder=3
        )
        figure.colorbar(points, ax=axes, label="iteration (training step)")
        low, high = float(g.min()), float(g.max())
        if high <= low:
            low, high = low / 1.5, high * 1.5
        grid = np.geomspace(low, high, 100)
        axes.plot(
            grid,
            fit.L0 + fit.L1 * grid,
            color="crimson",
            linewidth=1.8,
            label=f"envelope L0 + L1·g = {fit.L0:.3g} + {fit.L1:.3g}·g",
            zorder=2,
        )
        axes.legend(loc="best", fontsize="small")
    axes.set_xscale("log")
    axes.set_yscale("log")
    _plain_log_ticks(axes.xaxis)
    _plain_log_ticks(axes.yaxis)
    axes.set_xlabel("gradient norm ||∇f(x)||")
    axes.set_ylabel(f"smoothness: {smoothness_label}")
    spearman = format_number(fit.spearman_log, 3)
    axes.set_title(
        (f"{title}\n" if title else "")
        + f"{plural(fit.num_points, 'probe')}, Spearman log-log {spearman}",
        fontsize="medium",
    )
    axes.grid(True, which="major", alpha=0.3)
    return figure


def per_layer_figure(trajectory: Trajectory, analysis: PerLayerAnalysis, *, title: str = "") -> Any:
    """A per-layer run: each group's ||H_kk|| over the steps under the whole ||H|| (left), and
    each group's points against its gradient norm with its fitted envelope (right, log-log)."""
    figure = _new_figure(11.0, 4.6)
    over_steps, envelopes = figure.subplots(1, 2)
    probes = trajectory.probes
    whole = np.asarray(probes["hessian_norm"], dtype=np.float64)
    finite = np.isfinite(whole)
    over_steps.plot(
        np.asarray(probes["step"])[finite], whole[finite], color="black", linewidth=1.6,
        label="whole ||H||",
    )  # fmt: skip
    colors = [f"C{k % 10}" for k in range(len(analysis.order))]
    series = [whole[finite]]
    layer = trajectory.groups
    for color, name in zip(colors, analysis.order):
        if layer is not None:
            steps, values = layer.series(name, "hessian_norm")
            keep = np.isfinite(values)
            over_steps.plot(steps[keep], values[keep], marker=".", color=color, label=name)
            series.append(values[keep])
        group = analysis.group(name)
        g, L = np.asarray(group.points.grad_norm), np.asarray(group.points.smoothness)
        keep = _positive_finite(g, L)
        if not keep.any():
            continue
        envelopes.scatter(g[keep], L[keep], s=18, color=color, label=name, zorder=3)
        if group.fit is not None:
            grid = np.geomspace(float(g[keep].min()), float(g[keep].max()) * 1.0001, 60)
            envelopes.plot(
                grid, group.fit.L0 + group.fit.L1 * grid, color=color, linewidth=1.4, zorder=2
            )
    if _log_axis_wanted(series):
        over_steps.set_yscale("log")
        _plain_log_ticks(over_steps.yaxis)
    over_steps.set_xlabel("training step")
    over_steps.set_ylabel("||H_kk||, the group's diagonal block")
    over_steps.set_title((f"{title}\n" if title else "") + "sharpness per group", fontsize="medium")
    over_steps.legend(loc="best", fontsize="small")
    over_steps.grid(True, alpha=0.3)
    envelopes.set_xscale("log")
    envelopes.set_yscale("log")
    envelopes.set_xlabel("the group's gradient norm")
    envelopes.set_ylabel("||H_kk||")
    envelopes.set_title("each group's (L0, L1) envelope", fontsize="medium")
    envelopes.legend(loc="best", fontsize="small")
    envelopes.grid(True, which="major", alpha=0.3)
    return figure


def _per_layer_section(analysis: PerLayerAnalysis, image: str) -> str:
    """The HTML of the per-layer section: the figure, the ranked table, caveats, the snippet."""
    rows = [
        (
            str(rank),
            group.name,
            f"{group.num_parameters:,}",
            format_number(group.sharpness_share, 3),
            f"{group.largest_at}/{analysis.num_probes}",
            format_number(group.fit.L0) if group.fit else "-",
            format_number(group.fit.L1) if group.fit else "-",
            "none"
            if group.clip.clip_threshold is None
            else format_number(group.clip.clip_threshold),
            group.clip.note,
        )
        for rank, group in enumerate(analysis.groups, start=1)
    ]
    notes = "".join(f'<li class="warning">{html.escape(w)}</li>' for w in analysis.warnings)
    notes += "".join(f'<li class="caveat">{html.escape(c)}</li>' for c in analysis.caveats)
    header = ("#", "group", "parameters", "share of ||H||", "sharpest at", "L0", "L1",
              "clip c", "how")  # fmt: skip
    return "\n".join(
        [
            "<h2>Per layer: where the sharpness sits</h2>",
            "<p>For each parameter group, the top eigenvalue of the Hessian's diagonal block "
            "||H_kk|| (at most the whole ||H||, by Cauchy interlacing) over the steps, and "
            "against the group's gradient norm with its fitted envelope. Share: the median "
            "over the probes of ||H_kk|| / ||H||.</p>",
            image,
            _table(header, rows),
            f"<ul>{notes}</ul>",
            f"<pre>{html.escape(analysis.snippet())}</pre>",
        ]
    )


def _log_axis_wanted(values: Sequence[np.ndarray]) -> bool:
    """Log scale when every finite value is positive and they span more than a factor 10."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    if not finite.size:
        return False
    low, high = float(finite.min()), float(finite.max())
    return low > 0 and high > 10.0 * low


def series_figure(trajectory: Trajectory, *, title: str = "") -> Any:
    """Over the steps: loss, gradient norm, both smoothness estimates, the sharpness against the
    optimizer's stability threshold, the step size and the share of clipped steps, one panel
    each (a panel without data is left out)."""
    probes, train = trajectory.probes, trajectory.train

    def column(group: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray] | None:
        if name not in group or "step" not in group or not len(group["step"]):
            return None
        values = np.asarray(group[name], dtype=np.float64)
        if not np.isfinite(values).any():
            return None
        return np.asarray(group["step"], dtype=np.float64), values

    panels: list[tuple[str, list[tuple[str, Any, dict[str, Any]]]]] = [
        (
            "loss",
            [
                ("minibatch loss", column(train, "loss"), {"color": "0.6", "linewidth": 0.8}),
                ("probe loss", column(probes, "loss"), {"color": "C0", "marker": "o", "ms": 3}),
            ],
        ),
        (
            "gradient norm",
            [
                ("minibatch", column(train, "grad_norm"), {"color": "0.6", "linewidth": 0.8}),
                ("probe", column(probes, "grad_norm"), {"color": "C1", "marker": "o", "ms": 3}),
            ],
        ),
        (
            "smoothness",
            [
                (
                    "||Hessian|| (Lanczos)",
                    column(probes, "hessian_norm"),
                    {"color": "C3", "marker": "o", "ms": 3},
                ),
                (
                    "finite difference along the update",
                    column(probes, "smoothness_fd"),
                    {"color": "C2", "marker": "x", "ms": 4, "linestyle": "--"},
                ),
            ],
        ),
        ("step size (learning rate)", [("lr", column(train, "lr"), {"color": "C4"})]),
    ]
    stability = edge_of_stability(probes, train, trajectory.config)
    if stability is not None:  # the edge of stability, as `smoothprof plot` draws it
        steps = stability.step.astype(np.float64)
        panels.insert(
            3,
            (
                "sharpness / edge of stability",
                [
                    (
                        SHARPNESS_LABELS[stability.column],
                        (steps, stability.sharpness),
                        {"color": "C3", "marker": "o", "ms": 3},
                    ),
                    (
                        f"threshold {stability.rule.formula}",
                        (steps, stability.threshold),
                        {"color": "k", "linestyle": "--"},
                    ),
                ],
            ),
        )
    has_rows = "clipped" in train and "step" in train and len(train["step"]) > 0
    if has_rows and (trajectory.config.get("clip") is not None or np.any(train["clipped"])):
        flags = np.asarray(train["clipped"], dtype=np.float64)
        window = clipped_share_window(len(flags))
        share = 100.0 * rolling_share(flags, window)
        panels.append(
            (
                f"clipped steps, % of the last {window}",
                [
                    (
                        f"{np.mean(flags):.0%} of all steps",
                        (np.asarray(train["step"], dtype=np.float64), share),
                        {"color": "C5"},
                    )
                ],
            )
        )
    panels = [(name, [s for s in series if s[1] is not None]) for name, series in panels]
    panels = [(name, series) for name, series in panels if series]
    figure = _new_figure(7.5, 1.9 * max(1, len(panels)) + 0.6)
    axes_list = figure.subplots(max(1, len(panels)), 1, sharex=True, squeeze=False)[:, 0]
    for axes, (name, series) in zip(axes_list, panels):
        log_scale = _log_axis_wanted([values for _, (_, values), _ in series])
        for label, (steps, values), style in series:
            keep = np.isfinite(values) & ((values > 0) if log_scale else True)
            axes.plot(steps[keep], values[keep], label=label, **style)
        if log_scale:
            axes.set_yscale("log")
            _plain_log_ticks(axes.yaxis)
        else:
            finite = np.concatenate([v[np.isfinite(v)] for _, (_, v), _ in series])
            if name.startswith("clipped"):
                axes.set_ylim(0, 105)
            elif finite.size and finite.min() >= 0 and finite.max() > 0:
                axes.set_ylim(0, float(finite.max()) * 1.15)  # e.g. a constant lr: from zero
        axes.set_ylabel(name, fontsize="small")
        axes.grid(True, alpha=0.3)
        axes.legend(loc="best", fontsize="x-small")
    axes_list[-1].set_xlabel("training step")
    if title:
        figure.suptitle(title, fontsize="medium")
    return figure


def _run_rows(trajectory: Trajectory) -> list[tuple[str, str]]:
    config, attributes = trajectory.config, trajectory.attributes
    clip, lr = config.get("clip"), config.get("lr")
    rows = [
        ("trajectory file", str(trajectory.path)),
        ("model file", str(attributes.get("model_file", "-"))),
        ("created (UTC)", str(attributes.get("created_utc", "-"))),
        ("training steps recorded", str(len(trajectory.train.get("step", [])))),
        ("probes", str(trajectory.num_probes)),
        ("optimizer", str(config.get("optimizer", "-"))),
        ("lr", format_number(float(lr)) if isinstance(lr, (int, float)) else "-"),
        ("clip", "none" if not clip else format_number(float(clip))),
        ("device", str(attributes.get("device", "-"))),
        ("Hessian-vector products", str(attributes.get("hvp_method", "-"))),
        (
            "versions",
            f"smoothprof {attributes.get('smoothprof_version', '?')}, "
            f"torch {attributes.get('torch_version', '?')}",
        ),
    ]
    if "diverged_at_step" in attributes:
        rows.append(("diverged", f"at step {attributes['diverged_at_step']}"))
    if attributes.get("interrupted"):
        rows.append(("interrupted", "yes: the file holds the rows measured until then"))
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    attribute = f' class="{css}"' if css else ""
    return f"<table{attribute}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.headline { border: 2px solid #2a7; border-radius: 6px; padding: 0.6rem 1rem; background: #f4fbf6; }
.warning { color: #a60; } .caveat { color: #555; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
"""


def report_html(
    trajectory: Trajectory,
    fit: EnvelopeFit,
    recs: Recommendations,
    *,
    estimator: str,
    smoothness_png: bytes,
    series_png: bytes,
    grad_noise: float | None = None,
    skip_steps: int = 0,
    per_layer: PerLayerAnalysis | None = None,
    per_layer_png: bytes | None = None,
) -> str:
    """One HTML page: the run, the headline recommendation, the fit, every rule, both figures
    as data URIs (and, for a per-layer run, the per-layer section). Every text is escaped;
    nothing refers to a resource outside the page."""

    def image(data: bytes, alt: str) -> str:
        encoded = base64.b64encode(data).decode("ascii")
        return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'

    name = html.escape(trajectory.path.name)
    head = recs.headline
    clip = "none" if head.clip_threshold is None else format_number(head.clip_threshold)
    rules = [
        (
            str(number),
            rec.title + (" (headline)" if rec.rule == head.rule else ""),
            "none" if rec.clip_threshold is None else format_number(rec.clip_threshold),
            step_size_text(rec),
            rec.source,
        )
        for number, rec in enumerate(recs.rules, start=1)
    ]
    warnings = "".join(f'<li class="warning">{html.escape(w)}</li>' for w in recs.warnings)
    caveats = "".join(f'<li class="caveat">{html.escape(c)}</li>' for c in recs.caveats)
    skipped = f" Probes before step {skip_steps} were left out." if skip_steps else ""
    label = ESTIMATOR_LABELS.get(estimator, estimator)
    commands = profile_sweep_commands([trajectory], recs)
    sweep = (
        (
            "<p>The clipped sweep to tune it (add your fixed-step runs to the compare):</p>"
            if head.clip_threshold is not None
            else "<p>The sweep around the headline's step:</p>"
        )
        + f"<pre>{html.escape(chr(10).join(commands))}</pre>"
        if commands
        else ""
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>smoothprof report: {name}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>smoothprof report: {name}</h1>",
        '<div class="headline"><h2>Headline</h2>',
        f"<p><b>{html.escape(head.title)}</b>: clip threshold c = {html.escape(clip)}, "
        f"step size {html.escape(step_size_text(head))} "
        f"({html.escape(head.source)}).</p>",
        f"<p>{html.escape(recs.explanation)}</p>",
        f"<pre>{html.escape(pytorch_snippet(head, own_optimizer=recs.own_optimizer))}</pre>",
        sweep,
        "</div>",
        "<h2>Smoothness against gradient norm (Zhang et al. 2020, Figure 1)</h2>",
        f"<p>Each point is a probe; its colour is the training step. The line is the fitted "
        f"(L0, L1) envelope. Smoothness: {html.escape(label)}.{html.escape(skipped)}</p>",
        image(smoothness_png, "gradient norm against smoothness, log-log, with the envelope"),
        "<h2>(L0, L1) envelope fit</h2>",
        _table(("quantity", "value", "meaning"), fit_rows(fit, grad_noise=grad_noise)),
        "<h2>Suggested clip threshold and step size</h2>",
        _table(("#", "rule", "clip c", "step size", "source"), rules),
        "<p>Step sizes written a/(g + b) scale with the gradient norm g of each step.</p>",
        f"<pre>{html.escape(assumptions_text(recs.rules))}</pre>",
        f"<ul>{warnings}{caveats}</ul>",
        "<h2>Over the training steps</h2>",
        image(series_png, "loss, gradient norm, smoothness, step size, clipped share"),
        _per_layer_section(per_layer, image(per_layer_png, "each group's sharpness and envelope"))
        if per_layer is not None and per_layer_png is not None
        else "",
        "<h2>Run</h2>",
        _table(("what", "value"), _run_rows(trajectory)),
        f'<p class="caveat">Written by smoothprof {html.escape(__version__)}.</p>',
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


def write_report(
    trajectory: Trajectory,
    fit: EnvelopeFit,
    recs: Recommendations,
    output_dir: str | Path,
    *,
    estimator: str,
    grad_noise: float | None = None,
    skip_steps: int = 0,
    per_layer: PerLayerAnalysis | None = None,
) -> ReportFiles:
    """Draw both figures and write them, and the HTML page, into ``output_dir`` (created if
    needed; files of an earlier report there are replaced). With ``per_layer`` (the analysis
    of a per-layer run) also ``per_layer.png`` and its section of the page.

    The points of Figure 1 are the trajectory's probes at steps >= ``skip_steps`` in the
    column of ``estimator`` (hvp or fd), the points ``fit`` was fitted to.
    """
    require_matplotlib()
    from .analysis import ESTIMATOR_COLUMNS

    directory = Path(output_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ReportError(f"{directory}: cannot create the report directory ({error})") from None
    if not directory.is_dir():
        raise ReportError(f"{directory}: not a directory")
    probes = trajectory.probes
    steps = np.asarray(probes["step"])
    keep = steps >= skip_steps
    title = Path(str(trajectory.attributes.get("model_file", trajectory.path))).name
    smoothness = smoothness_figure(
        probes["grad_norm"][keep],
        probes[ESTIMATOR_COLUMNS[estimator]][keep],
        steps[keep],
        fit,
        smoothness_label=ESTIMATOR_LABELS.get(estimator, estimator),
        title=title,
    )
    smoothness_png = _png_bytes(smoothness)
    series_png = _png_bytes(series_figure(trajectory, title=title))
    per_layer_png = None
    if per_layer is not None:
        per_layer_png = _png_bytes(per_layer_figure(trajectory, per_layer, title=title))
    files = ReportFiles(
        smoothness_png=directory / SMOOTHNESS_PNG,
        series_png=directory / SERIES_PNG,
        html=directory / REPORT_HTML,
        per_layer_png=None if per_layer is None else directory / PER_LAYER_PNG,
    )
    page = report_html(
        trajectory,
        fit,
        recs,
        estimator=estimator,
        smoothness_png=smoothness_png,
        series_png=series_png,
        grad_noise=grad_noise,
        skip_steps=skip_steps,
        per_layer=per_layer,
        per_layer_png=per_layer_png,
    )
    try:
        files.smoothness_png.write_bytes(smoothness_png)
        files.series_png.write_bytes(series_png)
        if files.per_layer_png is not None and per_layer_png is not None:
            files.per_layer_png.write_bytes(per_layer_png)
        else:  # an earlier per-layer report's figure would not belong to this page
            (directory / PER_LAYER_PNG).unlink(missing_ok=True)
        files.html.write_text(page, encoding="utf-8")
    except OSError as error:
        raise ReportError(f"{directory}: cannot write the report ({error})") from None
    return files
