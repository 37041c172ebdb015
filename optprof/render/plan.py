"""`optprof plan` as tables (per optimizer: the chosen setup, the runners-up, why the others lost) and as a plot
(tokens/s per GPU against device memory, one colour per optimizer, the card as a line, the chosen setups marked)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group
from rich.table import Table
from rich.text import Text

from optprof.render.console import share, titled_table
from optprof.results.reports import PlanReport
from optprof.results.rows import PlanRow
from optprof.results.vocab import Status
from optprof.units import UNITS, format_bytes, format_ms, format_rate

if TYPE_CHECKING:
    from matplotlib.axes import Axes

COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def _why(row: PlanRow, units: str) -> str:
    """Why this setup lost (or what it is)."""
    _, unit = UNITS[units]
    if row.choice == "chosen":
        return "chosen"
    if row.status == Status.OK:
        return f"slower by {row.slower_by:.1%}" if row.slower_by is not None else "slower"
    if row.status == Status.NO_FIT:
        short = "" if row.short_by_bytes is None else f" by {format_bytes(row.short_by_bytes, units)} {unit}"
        how = "pruned by a bound" if row.pruned else "traced"
        return f"does not fit{short} ({how}: {row.reason})"
    return f"{row.status}: {row.reason}"


def plan_table(report: PlanReport, units: str) -> Group:
    _, unit = UNITS[units]
    config, search = report.config, report.search
    head = (f"PLAN (predicted) on {config.get('gpus')} x {config.get('gpu')}, seq {config.get('seq_len')}"
            + (f", global batch {config['global_batch_tokens']:,} tokens" if config.get("global_batch_tokens")
               else ", each setup at its largest micro-batch"))
    parts: list[Table | Text] = []
    best = titled_table(head)
    for name in ("optimizer", "setup", "µbatch\nx accum", f"device\n{unit}", "tokens/s\nper GPU", "MFU",
                 "step\nms", "confirmed\nby predict"):
        best.add_column(name, justify="left" if name in ("optimizer", "setup", "confirmed\nby predict") else "right",
                        no_wrap=name != "setup")
    chosen = report.chosen()
    for optimizer in dict.fromkeys(row.optimizer for row in report.results):
        row = chosen.get(optimizer)
        if row is None:
            reasons = {_why(r, units) for r in report.results if r.optimizer == optimizer}
            best.add_row(optimizer, "no setup fits", "-", "-", "-", "-", "-", "; ".join(sorted(reasons))[:200])
            continue
        confirmed = "; ".join(row.confirmed.get("differences", ["not run"])) if row.confirmed else "not run"
        best.add_row(optimizer, row.setup, f"{row.micro_batch} x {row.grad_accum}",
                     f"{format_bytes(row.predicted_device_bytes, units)} / "
                     f"{format_bytes(row.device_memory_bytes, units)}",
                     format_rate(row.predicted_tokens_per_s_per_gpu), share(row.predicted_mfu),
                     format_ms(row.predicted_step_s), confirmed)
    parts.append(best)
    detail = titled_table("Every setup, per optimizer: the chosen first, then the runners-up and why the others lost")
    for name in ("optimizer", "setup", "µbatch", f"device\n{unit}", "tokens/s\nper GPU", "why"):
        detail.add_column(name, justify="right" if name in ("µbatch", f"device\n{unit}", "tokens/s\nper GPU")
                          else "left", no_wrap=name in ("optimizer", "µbatch"))
    last = None
    for row in report.results:
        size = "-" if row.micro_batch is None else (
            f"{row.micro_batch}" + (f" x {row.grad_accum}" if (row.grad_accum or 1) > 1 else ""))
        detail.add_row(row.optimizer if row.optimizer != last else "", row.setup, size,
                       format_bytes(row.predicted_device_bytes, units), format_rate(row.predicted_tokens_per_s_per_gpu),
                       _why(row, units))
        last = row.optimizer
    parts.append(detail)
    searched = (f"{search.get('setups')} setups x {len(chosen) or len(set(r.optimizer for r in report.results))} "
                f"optimizers = {search.get('considered')} considered, {search.get('pruned')} pruned by a bound, "
                f"{search.get('traced')} setups traced; search {search.get('searched_s', 0):.1f} s"
                + ("" if search.get("confirm_s") is None else f", confirming predicts {search['confirm_s']:.1f} s"))
    parts.append(Text(searched, style="dim"))
    for row in chosen.values():
        if row.command:
            parts.append(Text(f"{row.optimizer}: {row.command}", style="dim"))
    parts += [Text("Assumed: " + a, style="dim") for a in report.assumptions]
    return Group(*parts)


def plan_panel(ax: Axes, report: PlanReport, scale: float, unit: str) -> None:
    """Tokens/s per GPU against device memory per setup, one colour per optimizer; the card's memory as a line;
    each optimizer's chosen setup ringed."""
    optimizers = list(dict.fromkeys(row.optimizer for row in report.results))
    for index, optimizer in enumerate(optimizers):
        points = [((r.predicted_device_bytes or 0) / scale, r.predicted_tokens_per_s_per_gpu or 0.0, r)
                  for r in report.results if r.optimizer == optimizer and r.predicted_tokens_per_s_per_gpu
                  and r.predicted_device_bytes]
        colour = COLOURS[index % len(COLOURS)]
        ax.scatter([x for x, _, _ in points], [y for _, y, _ in points], color=colour, s=18, alpha=0.7,
                   label=optimizer)
        for x, y, row in points:
            if row.choice == "chosen":
                ax.scatter([x], [y], s=160, facecolors="none", edgecolors=colour, linewidths=2)
                ax.annotate(f"{optimizer}: {row.setup}, µbatch {row.micro_batch}", (x, y), textcoords="offset points",
                            xytext=(-12, -16 - 12 * index), ha="right", fontsize=7, color=colour)
    memory = report.config.get("gpu_memory_bytes")
    if memory:
        ax.axvline(memory / scale, color="black", linestyle="--", linewidth=1, label="the card's memory")
    ax.set_xlabel(f"predicted device memory per GPU ({unit})")
    ax.set_ylabel("predicted tokens/s per GPU")
    ax.set_title("Each setup that fits, at its chosen micro-batch (ringed: the chosen setup)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
