"""Reports as pictures (`--plot FILE.png`, and the figures of `-f html`): matplotlib on its Agg backend, so no
display is needed; imported only when a plot is asked for, so `optprof --help` stays fast.

Each report gets the panels that fit it, one under another in one image:
- memory: a stacked bar per optimizer (parameters, gradients, state, activations, temporaries), the limit as a
  line, and the measured peak sources (allocator, NVML, RSS) and the prediction as markers;
- micro-batch (`--micro-batch auto`, or predict with --gpu-memory): each optimizer's peak against the
  micro-batch, the limit and the largest that fits; tokens/s at the size measured, with its 95% interval;
- state-size: state per optimizer, grouped by family, against AdamW's;
- predicted against measured, where a compare row has both;
- tune: each optimizer's best trial's training loss by step, and the best held-out loss expected against the
  trials spent.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from optprof.render.console import report_units
from optprof.results.reports import (
    CompareReport,
    ModelReport,
    PlanReport,
    PredictReport,
    StateSizeReport,
    TuneReport,
)
from optprof.results.vocab import BREAKDOWN_KEYS, Status
from optprof.units import UNITS

if TYPE_CHECKING:
    from matplotlib.axes import Axes

CATEGORY_COLOURS = {"parameters": "#4c72b0", "gradients": "#dd8452", "optimizer_state": "#c44e52",
                    "activations": "#55a868", "temporaries": "#8172b3", "reserve": "#b0b0b0"}
CATEGORY_LABELS = {"parameters": "parameters", "gradients": "gradients", "optimizer_state": "optimizer state",
                   "activations": "activations", "temporaries": "temporaries", "reserve": "reserve (CUDA context, "
                   "workspaces, allocator slack)"}
PEAK_MARKERS = {"torch_max_reserved_bytes": ("allocator reserved", "v"),
                "nvml_process_peak_bytes": ("NVML process", "D"),
                "rss_peak_bytes": ("process RSS (interpreter and libraries too)", "s"),
                "predicted_peak_bytes": ("predicted", "x")}
PANEL_HEIGHT = 3.6  # inches per panel
WIDTH = 10.0  # inches

Panel = Callable[["Axes", Any, float, str], None]


def plot_png(report: ModelReport, units: str | None = None) -> bytes:
    """The report's figures as one PNG (bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    chosen = report_units(report, units)
    scale, unit = UNITS[chosen]
    panels = panels_for(report)
    figure = Figure(figsize=(WIDTH, PANEL_HEIGHT * max(1, len(panels)) + 0.6), layout="constrained")
    figure.suptitle(title(report), fontsize=11)
    axes = figure.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=False):
        panel(ax, report, scale, unit)
    if not panels:
        axes[0].text(0.5, 0.5, "no row measured: nothing to plot", ha="center", va="center")
        axes[0].set_axis_off()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def title(report: ModelReport) -> str:
    m = report.model
    setup = "" if m.setup == "full training" else f", {m.setup}"
    if isinstance(report, CompareReport):
        where = f"measured on {report.device.get('name') or report.device.get('type', 'the device')}"
    elif isinstance(report, PredictReport):
        where = f"predicted for {report.config.get('target_device')} (fake tensors)"
    elif isinstance(report, PlanReport):
        where = f"plan for {report.config.get('gpus')} x {report.config.get('gpu')} (predicted, fake tensors)"
    elif isinstance(report, TuneReport):
        c = report.config
        where = (f"{c.get('trials')} trials per optimizer of {c.get('steps')} steps, held-out loss "
                 f"({'byte' if report.corpus.tokenizer == 'bytes' else 'tokenizer'} tokens)")
    else:
        where = "optimizer state, measured on the meta device"
    ranks = 1 if isinstance(report, PlanReport) else report.config.get("gpus") or 1
    per_rank = f", per rank of {ranks} ({report.config.get('strategy')})" if ranks > 1 else ""
    amp = report.config.get("amp")
    precision = f"{m.dtype} weights, {amp} autocast" if amp else m.dtype
    return f"{m.name} ({precision}{setup}): {where}{per_rank}"


def panels_for(report: ModelReport) -> list[Panel]:
    """The panels that have something to show for this report."""
    ok = [row for row in report.rows() if row.status == Status.OK]
    if isinstance(report, StateSizeReport):
        return [_state_panel] if any(row.state_bytes is not None for row in ok) else []
    if isinstance(report, TuneReport):
        return [_best_curves_panel, _budget_panel] if any(row.best_trial is not None for row in ok) else []
    if isinstance(report, PlanReport):
        from optprof.render.plan import plan_panel

        return [plan_panel] if any(row.predicted_tokens_per_s_per_gpu for row in ok) else []
    if isinstance(report, PredictReport):
        panels: list[Panel] = [_predicted_memory_panel] if any(row.predicted_breakdown for row in ok) else []
        if any(len(row.predicted_peaks) > 1 for row in ok):
            panels.append(_predicted_micro_batch_panel)
        return panels
    assert isinstance(report, CompareReport)
    panels = [_measured_memory_panel] if any(row.breakdown for row in ok) else []
    if any(row.search for row in report.results):
        panels += [_searched_micro_batch_panel, _throughput_panel]
    if any(row.predicted_peak_bytes and row.tensor_peak_bytes for row in ok):
        panels.append(_prediction_panel)
    return panels


# ---------------------------------------------------------------------------------------------- memory


def _stacked_bars(ax: Axes, names: Sequence[str], stacks: Sequence[dict[str, int]], scale: float) -> None:
    bottoms = [0.0] * len(names)
    for key in [*BREAKDOWN_KEYS, "reserve"]:
        heights = [stack.get(key, 0) / scale for stack in stacks]
        if any(heights):
            ax.bar(names, heights, bottom=bottoms, color=CATEGORY_COLOURS[key], label=CATEGORY_LABELS[key],
                   width=0.6)
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]


def _limit_line(ax: Axes, limit: int | None, scale: float, label: str) -> None:
    if limit:
        ax.axhline(limit / scale, color="black", linestyle="--", linewidth=1, label=label)


def _finish_memory_axes(ax: Axes, unit: str, heading: str) -> None:
    ax.set_ylabel(f"memory ({unit})")
    ax.set_title(heading, fontsize=10, loc="left")
    ax.tick_params(axis="x", labelrotation=20)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _measured_memory_panel(ax: Axes, report: CompareReport, scale: float, unit: str) -> None:
    rows = [row for row in report.results if row.status == Status.OK and row.breakdown]
    names = [row.optimizer for row in rows]
    _stacked_bars(ax, names, [row.breakdown for row in rows], scale)
    for field, (label, marker) in PEAK_MARKERS.items():
        points = [(row.optimizer, getattr(row, field)) for row in rows if getattr(row, field)]
        if points:
            ax.scatter([n for n, _ in points], [v / scale for _, v in points], marker=marker, color="black",
                       zorder=3, s=28, label=label)
    limit = next((row.memory_limit_bytes for row in rows if row.memory_limit_bytes), None)
    _limit_line(ax, limit, scale, "memory limit")
    sizes = sorted({row.micro_batch for row in rows if row.micro_batch is not None})
    _finish_memory_axes(ax, unit, f"Memory at the peak by category (tensor level), micro-batch "
                        f"{', '.join(str(s) for s in sizes)}; markers: the peak as other sources measured it")


def _predicted_memory_panel(ax: Axes, report: PredictReport, scale: float, unit: str) -> None:
    rows = [row for row in report.results if row.status == Status.OK and row.predicted_breakdown]
    reserve = report.config.get("reserve_bytes") or 0
    stacks = [{**row.predicted_breakdown, "reserve": reserve} for row in rows]
    _stacked_bars(ax, [row.optimizer for row in rows], stacks, scale)
    _limit_line(ax, report.config.get("gpu_memory_bytes"), scale, "device memory (--gpu-memory)")
    size = rows[0].micro_batch if rows else None
    _finish_memory_axes(ax, unit, f"Predicted peak by category at micro-batch {size} (fake tensors)")


# ---------------------------------------------------------------------------------------------- micro-batch


def _peak_curves(ax: Axes, curves: dict[str, list[tuple[int, int, bool]]], largest: dict[str, int | None],
                 limit: int | None, scale: float, unit: str, heading: str) -> None:
    """Each optimizer's (micro-batch, peak, fits) points, its largest fitting size ringed, the limit dashed."""
    for index, (name, points) in enumerate(curves.items()):
        colour = f"C{index % 10}"
        points = sorted(points)
        ax.plot([b for b, _, _ in points], [p / scale for _, p, _ in points], marker="o", color=colour, label=name)
        misses = [(b, p) for b, p, fits in points if not fits]
        if misses:
            ax.scatter([b for b, _ in misses], [p / scale for _, p in misses], marker="x", color=colour, s=60)
        best = next(((b, p) for b, p, _ in points if b == largest.get(name)), None)
        if best is not None:
            ax.scatter([best[0]], [best[1] / scale], s=160, facecolors="none", edgecolors=colour, linewidths=1.5)
    _limit_line(ax, limit, scale, "limit")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("micro-batch (sequences)")
    ax.set_ylabel(f"peak ({unit})")
    ax.set_title(heading, fontsize=10, loc="left")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _searched_micro_batch_panel(ax: Axes, report: CompareReport, scale: float, unit: str) -> None:
    rows = [row for row in report.results if row.search]
    curves = {row.optimizer: [(p.micro_batch, p.peak_bytes, p.fits) for p in row.search if p.peak_bytes]
              for row in rows}
    limit = next((p.limit_bytes for row in rows for p in row.search if p.limit_bytes), None)
    _peak_curves(ax, curves, {row.optimizer: row.max_micro_batch for row in rows}, limit, scale, unit,
                 "Measured peak against micro-batch (x: did not fit; ring: the largest that fits)")


def _predicted_micro_batch_panel(ax: Axes, report: PredictReport, scale: float, unit: str) -> None:
    rows = [row for row in report.results if row.status == Status.OK and row.predicted_peaks]
    memory, reserve = report.config.get("gpu_memory_bytes"), report.config.get("reserve_bytes") or 0
    usable = memory - reserve if memory else None
    curves = {row.optimizer: [(b, p, usable is None or p <= usable) for b, p in row.predicted_peaks.items()]
              for row in rows}
    _peak_curves(ax, curves, {row.optimizer: row.predicted_max_micro_batch for row in rows}, usable, scale, unit,
                 "Predicted peak against micro-batch (limit: --gpu-memory less the reserve)")


def _throughput_panel(ax: Axes, report: CompareReport, scale: float, unit: str) -> None:
    rows = [row for row in report.results if row.status == Status.OK and row.tokens_per_s]
    values = [row.tokens_per_s or 0.0 for row in rows]
    errors = [[max(0.0, v - (row.tokens_per_s_ci95 or (v, v))[0]) for row, v in zip(rows, values, strict=True)],
              [max(0.0, (row.tokens_per_s_ci95 or (v, v))[1] - v) for row, v in zip(rows, values, strict=True)]]
    labels = [f"{row.optimizer}\n(micro-batch {row.micro_batch})" for row in rows]
    ax.bar(labels, values, yerr=errors, capsize=4, color="#4c72b0", width=0.6)
    ax.set_ylabel("tokens/s")
    ax.set_title("Throughput at the micro-batch measured (bars: 95% interval of the median step)", fontsize=10,
                 loc="left")
    ax.tick_params(axis="x", labelsize=8)


# ---------------------------------------------------------------------------------------------- state, prediction


def _state_panel(ax: Axes, report: StateSizeReport, scale: float, unit: str) -> None:
    rows = sorted((row for row in report.results if row.status == Status.OK and row.state_bytes is not None),
                  key=lambda row: (row.family, row.state_bytes or 0))
    families = list(dict.fromkeys(row.family for row in rows))
    colours = {family: f"C{index % 10}" for index, family in enumerate(families)}
    positions = list(range(len(rows)))
    values = [(row.state_bytes or 0) / scale for row in rows]
    ax.barh(positions, values, color=[colours[r.family] for r in rows])
    for position, value in zip(positions, values, strict=True):  # so that a state of (almost) nothing shows
        ax.text(value, position, f" {value:,.2f}" if value >= 0.01 or value == 0 else " <0.01", va="center",
                fontsize=7)
    positive = sorted(v for v in values if v > 0)
    log = bool(positive) and positive[-1] > 50 * positive[len(positive) // 2]  # outliers would flatten the rest
    if log:
        ax.set_xscale("symlog", linthresh=positive[0])
    ax.set_xlim(0, max(values, default=1) * (3 if log else 1.12) or 1)
    ax.set_yticks(positions, [row.optimizer for row in rows], fontsize=8)
    ax.invert_yaxis()
    if report.reference_state_bytes:
        ax.axvline(report.reference_state_bytes / scale, color="black", linestyle="--", linewidth=1)
        ax.text(report.reference_state_bytes / scale, -0.7, " AdamW", fontsize=8, va="bottom")
    for family, colour in colours.items():
        ax.bar(0, 0, color=colour, label=family)  # legend entries only
    ax.set_xlabel(f"optimizer state ({unit}{', log scale above the smallest' if log else ''})")
    ax.set_title("Optimizer state by optimizer, grouped by family (dashed: AdamW)", fontsize=10, loc="left")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    from matplotlib.figure import Figure

    figure = ax.figure
    if isinstance(figure, Figure):  # a panel's axes belong to the report's one figure
        figure.set_size_inches(WIDTH, max(PANEL_HEIGHT, 0.28 * len(rows) + 1.5))


def _prediction_panel(ax: Axes, report: CompareReport, scale: float, unit: str) -> None:
    rows = [row for row in report.results if row.status == Status.OK and row.predicted_peak_bytes
            and row.tensor_peak_bytes]
    positions = list(range(len(rows)))
    measured = [(row.tensor_peak_bytes or 0) / scale for row in rows]
    predicted = [(row.predicted_peak_bytes or 0) / scale for row in rows]
    ax.bar([p - 0.2 for p in positions], measured, width=0.4, label="measured (tensor peak)", color="#4c72b0")
    ax.bar([p + 0.2 for p in positions], predicted, width=0.4, label="predicted (fake tensors)", color="#dd8452")
    for position, m, p in zip(positions, measured, predicted, strict=True):
        ax.text(position, max(m, p), f"{(p / m - 1) * 100:+.1f}%", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(positions, [row.optimizer for row in rows])
    ax.set_ylabel(f"peak ({unit})")
    ax.set_title("Predicted against measured tensor peak (label: the prediction's error)", fontsize=10, loc="left")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


# ---------------------------------------------------------------------------------------------- tune


def _best_curves_panel(ax: Axes, report: TuneReport, scale: float, unit: str) -> None:
    curves = []
    for index, row in enumerate(r for r in report.results if r.best_trial is not None):
        best = next(t for t in row.trials if t.index == row.best_trial)
        curves.append(best.train_losses)
        ax.plot(range(1, len(best.train_losses) + 1), best.train_losses, color=f"C{index % 10}", linewidth=1.2,
                label=f"{row.optimizer} (held-out {row.best_val_loss:.3f})")
    start = max((curve[0] for curve in curves if curve), default=None)
    cut = start is not None and any(value > 1.1 * start for curve in curves for value in curve)
    if cut and start is not None:  # a spike far above the start would flatten every curve
        ax.set_ylim(top=1.1 * start)
    ax.set_xlabel("optimizer step")
    from matplotlib.ticker import MaxNLocator

    locator = ax.xaxis.get_major_locator()
    if isinstance(locator, MaxNLocator):  # matplotlib's default, AutoLocator, is one
        locator.set_params(integer=True)
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Training loss of each optimizer's best trial (legend: its held-out loss)"
                 + ("; axis cut at 110% of the start" if cut else ""), fontsize=10, loc="left")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _budget_panel(ax: Axes, report: TuneReport, scale: float, unit: str) -> None:
    budgets = [b.trials for b in report.ranking_by_budget]
    names = list(dict.fromkeys(name for b in report.ranking_by_budget for name in b.expected_best_val_loss))
    for index, name in enumerate(names):
        values = [b.expected_best_val_loss[name] for b in report.ranking_by_budget]
        ax.plot(budgets, values, marker="o", color=f"C{index % 10}", linewidth=1.2, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("trials spent per optimizer")
    ax.set_ylabel("expected best held-out loss")
    ax.set_title("Best loss against tuning budget (averaged over every order of the trials)", fontsize=10,
                 loc="left")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
