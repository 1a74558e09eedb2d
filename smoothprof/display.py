"""What the terminal shows: rich tables and plotext plots.

Plots are built as plain strings of a fixed width, so the same file gives the same bytes in a CI
log; colour is added only when asked, and ``ascii_only`` swaps box-drawing characters for ASCII.
"""

from __future__ import annotations

import math
import os
import shlex
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotext as plt
from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .compare import FINAL_SHARE, Comparison, short_labels
from .fit import EnvelopeFit
from .per_layer import PerLayerAnalysis
from .recommend import Recommendation, Recommendations, pytorch_snippet
from .schedule import SCHEDULE_OPTIONS
from .stability import EdgeOfStability, edge_of_stability
from .trajectory import Trajectory
from .wording import plural


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


# Training progress: the probes of each third of a run get their own marker (and colour), so the
# log-log scatter shows where along the run each point was measured, also without colour.
PROGRESS_THIRDS = (
    ("early (first third of the run)", "o", "green+"),
    ("middle third", "x", "orange+"),
    ("late (last third)", "*", "red+"),
)


def progress_third(progress: np.ndarray) -> np.ndarray:
    """0, 1 or 2: the third of the run (early, middle, late) a progress fraction falls in.

    >>> progress_third(np.array([0.0, 0.33, 0.34, 0.66, 0.67, 1.0])).tolist()
    [0, 0, 1, 1, 2, 2]
    """
    return np.minimum((np.asarray(progress, dtype=np.float64) * 3.0).astype(int), 2)


def rolling_share(flags: np.ndarray, window: int) -> np.ndarray:
    """Share of true flags over the trailing `window` entries (fewer at the start).

    >>> rolling_share(np.array([1, 0, 1, 1]), 2).tolist()
    [1.0, 0.5, 0.5, 1.0]
    """
    flags = np.asarray(flags, dtype=np.float64)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    totals = np.cumsum(np.concatenate(([0.0], flags)))
    ends = np.arange(1, flags.size + 1)
    starts = np.maximum(ends - window, 0)
    return (totals[ends] - totals[starts]) / (ends - starts)


def envelope_plot(
    grad_norm: np.ndarray,
    smoothness: np.ndarray,
    fit: EnvelopeFit,
    *,
    progress: np.ndarray | None = None,
    width: int = 100,
    height: int = 24,
    color: bool = False,
    ascii_only: bool = False,
    smoothness_label: str = "smoothness",
) -> str:
    """Gradient norm against smoothness on log axes, with the fitted envelope L0 + L1 g.

    With `progress` (the fraction of the run done at each point, see analysis.training_progress) the
    points of the early, middle and late third of the run get their own marker and legend entry.
    """
    grad_norm = np.asarray(grad_norm, dtype=np.float64)
    smoothness = np.asarray(smoothness, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        keep = np.isfinite(grad_norm) & np.isfinite(smoothness) & (grad_norm > 0) & (smoothness > 0)
    g, s = grad_norm[keep], smoothness[keep]
    _start_figure(width, height, color)
    plt.xscale("log")
    plt.yscale("log")
    if len(g):
        grid = np.geomspace(g.min(), g.max(), 60)
        envelope = fit.L0 + fit.L1 * grid
        plt.plot(
            grid.tolist(),
            envelope.tolist(),
            marker=".",
            label=f"envelope L0 + L1 g = {fit.L0:.3g} + {fit.L1:.3g} g",
            color="blue+" if color else None,
        )
        if progress is None:
            plt.scatter(
                g.tolist(), s.tolist(), marker="*", label="probes", color="red+" if color else None
            )
        else:
            thirds = progress_third(np.asarray(progress, dtype=np.float64)[keep])
            for index, (label, marker, hue) in enumerate(PROGRESS_THIRDS):
                chosen = thirds == index
                if chosen.any():
                    plt.scatter(
                        g[chosen].tolist(),
                        s[chosen].tolist(),
                        marker=marker,
                        label=label,
                        color=hue if color else None,
                    )
    plt.title(f"{smoothness_label} against gradient norm ({plural(fit.num_points, 'probe')})")
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
    """Over the training steps: loss, gradient norm, both smoothness estimates, the step size
    and the share of clipped steps (over a trailing window, in percent), one figure each.

    Each series has its own marker, so they stay apart without colour. A panel is drawn on a
    log y axis when its values are positive and span more than a factor 10, else on a linear
    one; a panel without any finite value is left out.
    """
    probes, train = trajectory.probes, trajectory.train
    panels = [
        ("loss", [("train loss", train, "loss", "."), ("probe loss", probes, "loss", "*")]),
        (
            "gradient norm",
            [("train", train, "grad_norm", "."), ("probe", probes, "grad_norm", "*")],
        ),
        (
            "smoothness",
            [
                ("||Hessian|| (Lanczos)", probes, "hessian_norm", "*"),
                ("finite diff. along the update", probes, "smoothness_fd", "x"),
            ],
        ),
        ("step size (learning rate)", [("lr", train, "lr", ".")]),
    ]
    stability = edge_of_stability(probes, train, trajectory.config)
    if stability is not None:
        panels.insert(3, _edge_of_stability_panel(stability))
    palette = ["blue+", "red+"]
    figures = []
    for title, series in panels:
        drawn = []
        for label, columns, name, marker in series:
            if name not in columns or "step" not in columns:
                continue
            values = np.asarray(columns[name], dtype=np.float64)
            keep = np.isfinite(values)
            if keep.any():
                drawn.append((label, marker, np.asarray(columns["step"])[keep], values[keep]))
        if not drawn:
            continue
        _start_figure(width, panel_height, color)
        plt.title(title)
        plt.xlabel("step")
        log_scale, limits = _y_axis(np.concatenate([values for *_, values in drawn]))
        if log_scale:
            plt.yscale("log")
        elif limits is not None:
            plt.ylim(*limits)
        for index, (label, marker, steps, values) in enumerate(drawn):
            if log_scale:
                steps, values = steps[values > 0], values[values > 0]
            steps, values = _thin(steps, values, width * 2)
            plt.plot(
                steps.tolist(),
                values.tolist(),
                marker=marker,
                label=label,
                color=palette[index] if color else None,
            )
        figures.append(_finish(plt.build(), color=color, ascii_only=ascii_only))
    clipped = _clipped_share_figure(train, width, panel_height, color)
    if clipped is not None:
        figures.append(_finish(clipped, color=color, ascii_only=ascii_only))
    return "\n".join(figures)


SHARPNESS_LABELS = {
    "hessian_norm": "||Hessian|| (Lanczos)",
    "preconditioned_sharpness": "top eig. of P^-1 H (Adam's P)",
}
OPTIMIZER_LABELS = {"sgd": "SGD", "momentum": "SGD + momentum", "adam": "Adam"}


def _edge_of_stability_panel(view: EdgeOfStability) -> tuple[str, list[tuple]]:
    """The sharpness and the optimizer's stability threshold, as a ``series_plot`` panel."""
    columns = {"step": view.step, "sharpness": view.sharpness, "threshold": view.threshold}
    title = f"edge of stability ({OPTIMIZER_LABELS[view.kind]}"
    if math.isfinite(view.late_ratio):
        title += f"; late probes at {view.late_ratio:.2f} x threshold"
    return title + ")", [
        (SHARPNESS_LABELS[view.column], columns, "sharpness", "*"),
        (f"threshold {view.rule.formula}", columns, "threshold", "-"),
    ]


def edge_of_stability_table(
    views: Sequence[tuple[str, EdgeOfStability]], *, ascii_only: bool = False
) -> Table:
    """Per file: the late probes' sharpness against the stability threshold of its optimizer."""
    table = _table("edge of stability: sharpness against the optimizer's threshold", ascii_only)
    for name in ("file", "optimizer", "sharpness", "threshold", "late sharpness / threshold"):
        table.add_column(name, overflow="fold")
    for path, view in views:
        late = "no probe with both"
        if view.late_steps is not None:
            first, last = view.late_steps
            late = f"{format_number(view.late_ratio, 3)} (median, steps {first}-{last})"
        table.add_row(
            *(
                _text(cell, ascii_only)
                for cell in (
                    _shown_path(path), OPTIMIZER_LABELS[view.kind], view.rule.sharpness,
                    f"{view.rule.formula} = {format_number(view.late_threshold)}", late,
                )
            )
        )  # fmt: skip
    sources = sorted({view.rule.source for _, view in views})
    table.caption = _text(
        "near 1: training at the edge of stability; above 1: beyond it. "
        f"Source: {'; '.join(sources)}",
        ascii_only,
    )
    return table


def _y_axis(values: np.ndarray) -> tuple[bool, tuple[float, float] | None]:
    """(log scale?, linear limits or None) for finite values: log when all are positive and span
    more than a factor 10; a constant series gets limits around it (plotext cannot scale one)."""
    low, high = float(np.min(values)), float(np.max(values))
    if low > 0 and high > 10.0 * low:
        return True, None
    if high == low:
        margin = abs(low) / 2.0 if low != 0 else 1.0
        return False, (low - margin, high + margin)
    return False, None


def clipped_share_window(num_steps: int) -> int:
    """The trailing window of the clipped-share series: a fiftieth of the run, at least 1 step."""
    return max(1, num_steps // 50)


def _clipped_share_figure(train: dict, width: int, height: int, color: bool) -> str | None:
    """The share of clipped steps over a trailing window, in percent; None without train rows."""
    if "clipped" not in train or "step" not in train or not len(train["step"]):
        return None
    steps = np.asarray(train["step"])
    flags = np.asarray(train["clipped"], dtype=np.float64)
    window = clipped_share_window(len(steps))
    share = 100.0 * rolling_share(flags, window)
    steps, share = _thin(steps, share, width * 2)
    _start_figure(width, height, color)
    overall = float(np.mean(flags))
    plt.title(
        f"share of clipped steps, % over the last {window} step(s) "
        f"({overall:.0%} of all {plural(len(flags), 'step')})"
    )
    plt.ylim(0, 100)
    plt.plot(
        steps.tolist(),
        share.tolist(),
        marker=".",
        label="clipped",
        color="orange+" if color else None,
    )
    plt.xlabel("step")
    return plt.build()


def _thin(steps: np.ndarray, values: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    if len(steps) <= limit:
        return steps, values
    index = np.unique(np.linspace(0, len(steps) - 1, limit).round().astype(int))
    return steps[index], values[index]


def _table(title: str, ascii_only: bool) -> Table:
    return Table(
        title=title,
        show_header=True,
        header_style="bold",
        box=box.ASCII if ascii_only else box.HEAVY_HEAD,
    )


def _text(text: str, ascii_only: bool, style: str = "", *, unbroken: bool = False) -> Text:
    """Plain text, never parsed as markup; ASCII only when asked (before layout, so widths hold).

    ``unbroken`` text stays on one line whatever the width (a command to paste): printed
    without cropping, it runs past the right edge."""
    return Text(
        to_ascii(text) if ascii_only else text,
        style=style,
        no_wrap=unbroken or None,
        overflow="ignore" if unbroken else None,
    )


def fit_rows(
    fit: EnvelopeFit, *, grad_noise: float | None = None, skip_steps: int = 0
) -> list[tuple[str, str, str]]:
    """(quantity, value, meaning) for the fitted constants and the statistics beside them: the
    rows of the terminal's fit table and of the HTML report's."""

    def interval(bounds: tuple[float, float] | None) -> str:
        if bounds is None:
            return ""
        return f" [{format_number(bounds[0])}, {format_number(bounds[1])}]"

    level = f"{fit.confidence:.0%} bootstrap interval" if fit.L0_interval else ""
    skipped = f"; probes before step {skip_steps} skipped" if skip_steps else ""
    noise = (
        ("-", "not measured: needs 2 or more probe batches")
        if grad_noise is None
        else (format_number(grad_noise), "median spread of per-batch gradients over the probes")
    )
    return [
        ("L0", format_number(fit.L0) + interval(fit.L0_interval), level),
        ("L1", format_number(fit.L1) + interval(fit.L1_interval), level),
        (
            "points",
            str(fit.num_points),
            f"{fit.num_dropped} dropped (non-finite or <= 0){skipped}",
        ),
        ("under envelope", f"{fit.share_below:.1%}", f"quantile fit at {fit.quantile:g}"),
        (
            "Spearman log-log",
            format_number(fit.spearman_log, 3),
            "correlation of log smoothness with log gradient norm",
        ),
        ("Pearson log-log", format_number(fit.pearson_log, 3), ""),
        ("L_max", format_number(fit.L_max), "largest measured smoothness"),
        ("G_max", format_number(fit.G_max), "largest measured gradient norm"),
        ("gradient noise τ", *noise),
    ]


def fit_summary(
    fit: EnvelopeFit,
    estimator: str,
    source_files: Sequence[str],
    *,
    grad_noise: float | None = None,
    skip_steps: int = 0,
    ascii_only: bool = False,
) -> Table:
    """The fitted constants and the statistics beside them.

    `grad_noise` is the gradient-noise level the recommendations used (None: not measured).
    """
    table = _table("(L0, L1) envelope fit", ascii_only)
    table.add_column("quantity", overflow="fold")
    table.add_column("value", justify="right", overflow="fold")
    table.add_column("meaning", overflow="fold")

    rows = fit_rows(fit, grad_noise=grad_noise, skip_steps=skip_steps)
    for row in rows:
        table.add_row(*(_text(cell, ascii_only) for cell in row))
    table.caption = _text(
        f"smoothness: {ESTIMATOR_LABELS[estimator]}; file(s): {', '.join(source_files)}",
        ascii_only,
    )
    return table


# The options of `smoothprof run` that the clipped sweep sets itself (besides -o): a sweep
# command does not repeat them from the profile. It probes nothing (--probe-every 0), so the
# profile's schedule, time budget and probe options do not apply either (the probe batches are
# drawn under a saved RNG state: training does not depend on them).
SWEEP_SETS = (
    "lr", "clip", *SCHEDULE_OPTIONS, "max_overhead", "probe_batches", "retain_graphs",
    "hvp_method", "estimators", "fd_points", "probe_mode", "rtol", "max_hvps",
    "max_basis", "probe_memory", "per_layer", "groups",
)  # fmt: skip
# Config values null that the command line spells: ``RunConfig.as_json`` writes an uncapped
# probe overhead (inf) as null.
_NULL_SPELLINGS = {"max_overhead": "inf"}


def run_option_words(name: str, value: Any) -> list[str] | None:
    """The ``smoothprof run`` words that give the run option ``name`` (a field of the run config,
    as the trajectory's ``config`` holds it) the value ``value``; None when the command line
    cannot say it. Underscores become dashes, a boolean a ``--flag`` or ``--no-flag``, a list
    its items joined by commas.

    >>> run_option_words("probe_batches", 2), run_option_words("retain_graphs", False)
    (['--probe-batches', '2'], ['--no-retain-graphs'])
    >>> run_option_words("fd_points", [0.25, 0.5]), run_option_words("max_overhead", None)
    (['--fd-points', '0.25,0.5'], ['--max-overhead', 'inf'])
    """
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + name.replace("_", "-")]
    if value is None:
        spelled = _NULL_SPELLINGS.get(name)
        return None if spelled is None else [flag, spelled]
    if isinstance(value, (list, tuple)):
        items = [_option_word(item) for item in value]
        if not items or any(item is None or "," in item for item in items):
            return None
        return [flag, ",".join(items)]  # type: ignore[arg-type]
    word = _option_word(value)
    return None if word is None else [flag, word]


def _option_word(value: Any) -> str | None:
    """A number or text as one command-line word that reads back as the same value."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or value == -math.inf:
            return None
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return value if isinstance(value, str) and value else None


_UNSET = object()


def profile_run_options(
    configs: Sequence[Mapping[str, Any]], built_in: Mapping[str, Any]
) -> list[str]:
    """The ``smoothprof run`` options that repeat the profiling runs' own: every run option of
    ``built_in`` (the built-in values, as ``RunConfig().as_json()`` gives them) that all
    ``configs`` give the same value other than the built-in one, in the order of ``built_in``;
    not those the sweep sets itself (``SWEEP_SETS``), nor a value the command line cannot say.

    >>> built_in = {"steps": 500, "lr": 0.1, "optimizer": "sgd", "seed": 0}
    >>> profile_run_options([{"steps": 60, "lr": 0.5, "seed": 0, "world_size": 1}], built_in)
    ['--steps', '60']
    >>> profile_run_options([{"optimizer": "adam", "seed": 3}, {"seed": 4}], built_in)
    []
    """
    words: list[str] = []
    for name, default in built_in.items():
        if name in SWEEP_SETS or not configs:
            continue
        values = [config.get(name, _UNSET) for config in configs]
        value = values[0]
        if value is _UNSET or any(other != value for other in values[1:]) or value == default:
            continue
        words += run_option_words(name, value) or []
    return words


def _built_in_run_options() -> dict[str, Any]:
    from .train import RunConfig  # imports torch: only when a sweep is shown

    return RunConfig().as_json()


def sweep_commands(
    model_file: str,
    recs: Recommendations,
    *,
    world_size: int = 1,
    options: Sequence[str] = (),
) -> list[str]:
    """The ``smoothprof run`` commands of the sweep around the headline (at its clip, or
    ``--no-clip`` when it does not clip), and the ``smoothprof compare`` that judges them. A
    profile of ``world_size`` > 1 processes gets its runs under torchrun with as many: the lr
    belongs to that global batch. ``options`` (see ``profile_run_options``) follow the sweep's
    own; every word is quoted for a POSIX shell where it needs it.

    >>> from smoothprof.fit import fit_envelope
    >>> from smoothprof.recommend import ProfilingRun, recommend
    >>> fit = fit_envelope([0.2, 0.5, 1.0, 2.0], [1.2, 1.5, 2.0, 3.0], num_bootstrap=0)
    >>> print("\\n".join(sweep_commands("model.py", recommend(fit, profile=ProfilingRun(lr=1)))))
    smoothprof run model.py --clip 1 --lr 1 --probe-every 0 -o clip_lr1.h5
    smoothprof run model.py --clip 1 --lr 2 --probe-every 0 -o clip_lr2.h5
    smoothprof run model.py --clip 1 --lr 5 --probe-every 0 -o clip_lr5.h5
    smoothprof run model.py --clip 1 --lr 10 --probe-every 0 -o clip_lr10.h5
    smoothprof run model.py --clip 1 --lr 20 --probe-every 0 -o clip_lr20.h5
    smoothprof compare clip_lr*.h5
    """
    clip = recs.headline.clip_threshold
    if not recs.sweep_lrs:
        return []
    launcher = ["torchrun", "--nproc_per_node", str(world_size), "-m"] if world_size > 1 else []
    clipping = ["--no-clip"] if clip is None else ["--clip", f"{clip:.6g}"]
    run = [*launcher, "smoothprof", "run", model_file, *clipping]
    prefix = "lr" if clip is None else "clip_lr"
    commands = []
    for lr in recs.sweep_lrs:
        output = f"{prefix}{lr:.3g}.h5"
        commands.append(
            shlex.join([*run, "--lr", f"{lr:.3g}", "--probe-every", "0", *options, "-o", output])
        )
    return [*commands, f"smoothprof compare {prefix}*.h5"]


def profile_sweep_commands(trajectories: Sequence[Trajectory], recs: Recommendations) -> list[str]:
    """``sweep_commands`` for the runs these files profiled: their model file (``MODEL.py``
    when they name none or several; relative to the working directory when below it), the
    options they ran with (``profile_run_options``) and, when they agree on it, their number of
    processes. None for a profile whose optimizer its model file made: ``--lr`` does not reach
    that optimizer (the headline's explanation says where to set the sweep's lr); none for a
    trainer callback's profile, which ``smoothprof run`` does not train."""
    if not recs.sweep_lrs:
        return []
    if any(t.config.get("optimizer_source") == "model file" for t in trajectories):
        return []  # --lr does not reach the model file's optimizer(): the explanation says so
    if any(t.config.get("optimizer_source") == "trainer" for t in trajectories):
        return []  # a trainer callback's run: `smoothprof run` would train another program
    model_files = {str(t.attributes.get("model_file") or "") for t in trajectories}
    model_file = model_files.pop() if len(model_files) == 1 else ""
    world_sizes = {_world_size(t) for t in trajectories}
    return sweep_commands(
        _shown_path(model_file) or "MODEL.py",
        recs,
        world_size=world_sizes.pop() if len(world_sizes) == 1 else 1,
        options=profile_run_options([t.config for t in trajectories], _built_in_run_options()),
    )


def _shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else as it is."""
    if not path or not os.path.isabs(path):
        return path
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return path if relative.startswith("..") else relative


def _world_size(trajectory: Trajectory) -> int:
    """The processes that ran the profile (1 for files from before the attribute)."""
    try:
        return max(1, int(trajectory.attributes.get("world_size", 1)))
    except (TypeError, ValueError):
        return 1


def recommendations_view(
    recs: Recommendations, *, ascii_only: bool = False, commands: Sequence[str] = ()
) -> Group:
    """Every supported rule, the headline explained, warnings and caveats, the ``commands`` of
    the clipped sweep (see ``profile_sweep_commands``; each on one line that is never wrapped,
    so print it with ``crop=False``), then the headline as ready-to-paste PyTorch."""
    table = _table("Suggested clip threshold and step size", ascii_only)
    table.add_column("#", justify="right")
    table.add_column("rule", overflow="fold")
    table.add_column("clip c", justify="right", overflow="fold")
    table.add_column("step size", justify="right", overflow="fold")
    table.add_column("source", overflow="fold")
    for number, rec in enumerate(recs.rules, start=1):
        marker = " (headline)" if rec.rule == recs.headline.rule else ""
        cells = (
            str(number),
            rec.title + marker,
            "none" if rec.clip_threshold is None else format_number(rec.clip_threshold),
            step_size_text(rec),
            rec.source,
        )
        table.add_row(*(_text(cell, ascii_only) for cell in cells))
    table.caption = _text(
        "step sizes written a/(g + b) scale with the gradient norm g of each step", ascii_only
    )
    lines = [_text(assumptions_text(recs.rules), ascii_only), _text(recs.explanation, ascii_only)]
    lines += [_text(f"warning: {w}", ascii_only, style="yellow") for w in recs.warnings]
    lines += [_text(f"note: {c}", ascii_only, style="dim") for c in recs.caveats]
    if commands:
        lines.append(
            _text(
                "The clipped sweep (add your fixed-step runs to the compare to judge clipping):"
                if recs.headline.clip_threshold is not None
                else "The sweep around the headline's step:",
                ascii_only,
            )
        )
        lines += [_text(f"  {command}", ascii_only, unbroken=True) for command in commands]
    snippet = Panel(
        _text(pytorch_snippet(recs.headline, own_optimizer=recs.own_optimizer), ascii_only),
        title=_text(f"headline: {recs.headline.title}", ascii_only),
        expand=False,
        box=box.ASCII if ascii_only else box.ROUNDED,
    )
    return Group(table, *lines, snippet)


def assumptions_text(rules: Sequence[Recommendation]) -> str:
    """What each rule assumes, one line per assumption, naming the rules by their number.

    >>> from smoothprof.recommend import Recommendation
    >>> rule = lambda a: Recommendation("r", "t", None, 1.0, "s", a)
    >>> print(assumptions_text([rule("smooth"), rule("noisy"), rule("smooth")]))
    assumptions of rules
      1, 3: smooth
      2: noisy
    """
    groups: dict[str, list[str]] = {}
    for number, rec in enumerate(rules, start=1):
        groups.setdefault(rec.assumptions, []).append(str(number))
    lines = [f"  {', '.join(numbers)}: {text}" for text, numbers in groups.items()]
    return "\n".join(["assumptions of rules", *lines])


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


# `smoothprof compare`: one marker per run (its number in the table), so curves stay apart
# without colour.
_RUN_COLORS = ("blue+", "red+", "green+", "orange+", "magenta+", "cyan+", "yellow+", "gray+")


def run_marker(index: int) -> str:
    """The plot marker of the run at ``index``: its number in the table, 1 to 9, then letters.

    >>> [run_marker(i) for i in (0, 8, 9)]
    ['1', '9', 'a']
    """
    symbols = "123456789abcdefghijklmnopqrstuvwxyz"
    return symbols[index % len(symbols)]


def compare_plot(
    comparison: Comparison,
    *,
    width: int = 100,
    height: int = 22,
    color: bool = False,
    ascii_only: bool = False,
) -> str:
    """The smoothed training loss of every run over the steps, and the target as a line."""
    _start_figure(width, height, color)
    drawn = [
        (index, steps[np.isfinite(values)], values[np.isfinite(values)])
        for index, (steps, values) in enumerate(comparison.curves)
    ]
    drawn = [(index, steps, values) for index, steps, values in drawn if len(values)]
    everything = [values for *_, values in drawn]
    if comparison.target is not None:
        everything.append(np.array([comparison.target]))
    log_scale, limits = (False, None)
    if everything:
        log_scale, limits = _y_axis(np.concatenate(everything))
    if log_scale:
        plt.yscale("log")
    elif limits is not None:
        plt.ylim(*limits)
    labels = short_labels([run.label for run in comparison.runs])
    for index, steps, values in drawn:
        if log_scale:
            steps, values = steps[values > 0], values[values > 0]
        steps, values = _thin(steps, values, width * 2)
        plt.plot(
            steps.tolist(),
            values.tolist(),
            marker=run_marker(index),
            label=f"{run_marker(index)} {labels[index]}",
            color=_RUN_COLORS[index % len(_RUN_COLORS)] if color else None,
        )
    if comparison.target is not None and drawn:
        first = min(int(steps[0]) for _, steps, _ in drawn)
        last = max(int(steps[-1]) for _, steps, _ in drawn)
        plt.plot(
            [first, last],
            [comparison.target, comparison.target],
            marker="-",
            label=f"target {comparison.target:.4g}",
            color="gray" if color else None,
        )
    plt.title(f"training loss, trailing mean over {comparison.window} step(s)")
    plt.xlabel("step")
    return _finish(plt.build(), color=color, ascii_only=ascii_only)


def compare_table(comparison: Comparison, *, ascii_only: bool = False) -> Table:
    """Per run: optimizer, lr, clip, final loss and the step at which it reached the target."""
    table = _table("Runs compared", ascii_only)
    for name, justify in (
        ("#", "right"),
        ("file", "left"),
        ("optimizer", "left"),
        ("lr", "right"),
        ("clip", "right"),
        ("steps", "right"),
        ("final loss", "right"),
        ("steps to target", "right"),
    ):
        table.add_column(name, justify=justify, overflow="fold")
    labels = short_labels([run.label for run in comparison.runs])
    for index, run in enumerate(comparison.runs):
        if run.steps_to_target is not None:
            reached = str(run.steps_to_target)
        elif comparison.target is None:
            reached = "-"
        else:
            reached = "not reached"
        if run.diverged_at_step is not None:
            reached += f" (diverged at {run.diverged_at_step})"
        cells = (
            run_marker(index),
            labels[index],
            run.optimizer or "-",
            format_number(run.lr),
            "none" if run.clip is None else format_number(run.clip),
            str(run.num_steps),
            format_number(run.final_loss),
            reached,
        )
        table.add_row(*(_text(cell, ascii_only) for cell in cells))
    target = "none" if comparison.target is None else format_number(comparison.target)
    note = f"\nnote: {comparison.target_note}" if comparison.target_note else ""
    table.caption = _text(
        f"final loss: mean minibatch loss over the last {FINAL_SHARE:.0%} of the steps; "
        f"steps to target: the first step at which the mean minibatch loss over the trailing "
        f"{comparison.window} step(s) is <= {target} ({comparison.target_rule}){note}",
        ascii_only,
    )
    return table


# Per-layer (``smoothprof fit --per-layer``, ``plot`` and ``report`` of a per-layer run).

GROUP_MARKERS = ("*", "x", "+", "o", "#", "@", "%", "&", "$", "~")
GROUP_COLORS = ("red+", "blue+", "green+", "magenta+", "cyan+", "yellow+")


def per_layer_table(analysis: PerLayerAnalysis, *, ascii_only: bool = False) -> Table:
    """The groups ranked by their share of the whole-model sharpness, each with its fit and its
    suggested clip threshold."""
    table = _table("per-layer: where the sharpness sits", ascii_only)
    for name, justify in (
        ("#", "right"), ("group", "left"), ("parameters", "right"), ("share of ||H||", "right"),
        ("sharpest at", "right"), ("L0", "right"), ("L1", "right"), ("Spearman", "right"),
        ("clip c", "right"),
    ):  # fmt: skip
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for rank, group in enumerate(analysis.groups, start=1):
        fit = group.fit
        cells = (
            str(rank),
            group.name,
            f"{group.num_parameters:,}",
            "-" if math.isnan(group.sharpness_share) else f"{group.sharpness_share:.3f}",
            f"{group.largest_at}/{analysis.num_probes}",
            format_number(fit.L0) if fit else "-",
            format_number(fit.L1) if fit else "-",
            format_number(fit.spearman_log, 3) if fit else "-",
            format_number(group.clip.clip_threshold) if group.clip.clip_threshold else "none",
        )
        table.add_row(*(_text(cell, ascii_only) for cell in cells))
    table.caption = _text(
        "share: median over the probes of ||H_kk|| / ||H||, the group's diagonal block against "
        "the whole Hessian (at most 1, Cauchy interlacing); sharpest at: probes where its block "
        "was the sharpest group's; L0, L1: the fit of ||H_kk|| against the group's gradient norm",
        ascii_only,
    )
    return table


def per_layer_view(analysis: PerLayerAnalysis, *, ascii_only: bool = False) -> Group:
    """The ranked table, warnings and caveats, then the per-group clipping as PyTorch."""
    lines = [_text(f"warning: {w}", ascii_only, style="yellow") for w in analysis.warnings]
    lines += [_text(f"note: {c}", ascii_only, style="dim") for c in analysis.caveats]
    for group in analysis.groups:
        if group.fit is None:
            lines.append(_text(f"{group.name}: {group.fit_problem}", ascii_only, style="yellow"))
        elif "capped" in group.clip.note:
            lines.append(_text(f"{group.name}: {group.clip.note}", ascii_only))
    snippet = Panel(
        _text(analysis.snippet(), ascii_only),
        title=_text("per-group clipping (measured, not proved)", ascii_only),
        expand=False,
        box=box.ASCII if ascii_only else box.ROUNDED,
    )
    return Group(per_layer_table(analysis, ascii_only=ascii_only), *lines, snippet)


def group_sharpness_plot(
    trajectory: Trajectory,
    *,
    width: int = 100,
    height: int = 18,
    color: bool = False,
    ascii_only: bool = False,
) -> str | None:
    """Each group's ||H_kk|| against the step, with the whole Hessian's ||H|| above them (log y
    axis when the values span more than a factor 10); None for a file without groups."""
    layer = trajectory.groups
    if layer is None:
        return None
    drawn = []
    probes = trajectory.probes
    whole = np.asarray(probes["hessian_norm"], dtype=np.float64)
    keep = np.isfinite(whole)
    if keep.any():
        drawn.append(("whole ||H||", "-", np.asarray(probes["step"])[keep], whole[keep]))
    for number, name in enumerate(layer.names):
        steps, values = layer.series(name, "hessian_norm")
        keep = np.isfinite(values)
        if keep.any():
            marker = GROUP_MARKERS[number % len(GROUP_MARKERS)]
            drawn.append((name, marker, steps[keep], values[keep]))
    if not drawn:
        return None
    _start_figure(width, height, color)
    plt.title("per-layer sharpness: ||H_kk|| of each group's diagonal block")
    plt.xlabel("step")
    log_scale, limits = _y_axis(np.concatenate([values for *_, values in drawn]))
    if log_scale:
        plt.yscale("log")
    elif limits is not None:
        plt.ylim(*limits)
    for index, (label, marker, steps, values) in enumerate(drawn):
        if log_scale:
            steps, values = steps[values > 0], values[values > 0]
        plt.plot(
            steps.tolist(),
            values.tolist(),
            marker=marker,
            label=label,
            color=GROUP_COLORS[index % len(GROUP_COLORS)] if color else None,
        )
    return _finish(plt.build(), color=color, ascii_only=ascii_only)


def group_envelope_plot(
    analysis: PerLayerAnalysis,
    *,
    width: int = 100,
    height: int = 24,
    color: bool = False,
    ascii_only: bool = False,
) -> str:
    """Every group's points (its gradient norm against its block's norm) on log axes, each
    group with its own marker and its fitted envelope L0 + L1 g drawn with dots."""
    _start_figure(width, height, color)
    plt.xscale("log")
    plt.yscale("log")
    for number, name in enumerate(analysis.order):
        group = analysis.group(name)
        g = np.asarray(group.points.grad_norm, dtype=np.float64)
        L = np.asarray(group.points.smoothness, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            keep = np.isfinite(g) & np.isfinite(L) & (g > 0) & (L > 0)
        if not keep.any():
            continue
        g, L = g[keep], L[keep]
        hue = GROUP_COLORS[number % len(GROUP_COLORS)] if color else None
        marker = GROUP_MARKERS[number % len(GROUP_MARKERS)]
        if group.fit is not None:
            grid = np.geomspace(g.min(), g.max(), 40)
            plt.plot(grid.tolist(), (group.fit.L0 + group.fit.L1 * grid).tolist(), marker=".",
                     color=hue)  # fmt: skip
        label = name
        if group.fit is not None:
            label += f": {group.fit.L0:.3g} + {group.fit.L1:.3g} g"
        plt.scatter(g.tolist(), L.tolist(), marker=marker, label=label, color=hue)
    plt.title("per-layer envelopes: ||H_kk|| against the group's gradient norm")
    plt.xlabel("group gradient norm")
    return _finish(plt.build(), color=color, ascii_only=ascii_only)
def watch_view(
    trajectory: Trajectory,
    header: str,
    *,
    fit: tuple[np.ndarray, np.ndarray, EnvelopeFit, str] | None = None,
    width: int = 100,
    panel_height: int = 10,
    latest: int = 5,
    color: bool = False,
    ascii_only: bool = False,
) -> Group:
    """``smoothprof watch``'s screen: ``header``, the latest probes, the loss and both
    smoothness estimates against the step, and the envelope fitted so far (``fit``: gradient
    norms, smoothness, the fit and its estimator's name; None before there is one)."""
    probes = trajectory.probes
    table = _table(f"latest probes ({trajectory.num_probes} so far)", ascii_only)
    for name in ("step", "loss", "|grad|", "||Hessian||", "finite diff."):
        table.add_column(name, justify="right")
    for index in range(max(0, trajectory.num_probes - latest), trajectory.num_probes):
        cells = [str(int(probes["step"][index]))]
        for column in ("loss", "grad_norm", "hessian_norm", "smoothness_fd"):
            values = probes.get(column)
            cells.append(format_number(float(values[index]) if values is not None else None))
        table.add_row(*cells)
    # The loss and smoothness panels of `smoothprof plot`, from those columns alone.
    shown = Trajectory(
        path=trajectory.path,
        attributes={},
        config={},
        probes={k: v for k, v in probes.items() if k in ("step", "loss", *_SMOOTHNESS_COLUMNS)},
        train={k: v for k, v in trajectory.train.items() if k in ("step", "loss")},
    )
    parts: list[Any] = [_text(header, ascii_only), table]
    figures = series_plot(
        shown, width=width, panel_height=panel_height, color=color, ascii_only=ascii_only
    )
    if figures:
        parts.append(Text.from_ansi(figures) if color else Text(figures))
    if fit is not None:
        grad_norm, smoothness, envelope, estimator = fit
        figure = envelope_plot(
            grad_norm,
            smoothness,
            envelope,
            width=width,
            height=panel_height + 2,
            color=color,
            ascii_only=ascii_only,
            smoothness_label=ESTIMATOR_LABELS[estimator],
        )
        parts.append(Text.from_ansi(figure) if color else Text(figure))
    return Group(*parts)


_SMOOTHNESS_COLUMNS = ("hessian_norm", "smoothness_fd")
