"""What every rendered report shares: the console, the model line, units, status cells and styles."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from optprof.config import Strategy
from optprof.results.reports import (
    CompareReport,
    ModelReport,
    StateSizeReport,
    TuneReport,
)
from optprof.results.rows import StatePart
from optprof.results.vocab import Status
from optprof.units import (
    UNIT_NOTES,
    UNITS,
    auto_units,
    format_bytes,
    format_count,
    format_fraction,
)

STATUS_STYLE = {Status.OK: "green", Status.FAILED: "bold red", Status.UNAVAILABLE: "yellow",
                Status.UNSUPPORTED: "yellow", Status.OOM: "magenta"}


def titled_table(title: str) -> Table:
    """The simple table every command's output uses: its title on the left, a rule under the header."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))


def share(value: float | None) -> str:
    """A fraction as a percentage, one decimal ('-' when unknown)."""
    return "-" if value is None else f"{100 * value:.1f}%"


def units_note(units: str) -> str:
    return UNIT_NOTES[units]


def model_line(report: ModelReport) -> Text:
    m = report.model
    tied = "tied" if m.tied_embeddings else "untied"
    attention = (f"{m.num_heads} heads / {m.num_kv_heads} kv, head dim {m.head_dim}, " if m.num_heads
                 else "no attention, ")
    experts = (f"{m.num_experts} experts, {m.experts_per_token} per token: {format_count(m.active_params)} "
               "parameters active per token; " if m.num_experts else "")
    trainable = m.trainable_params
    setup = (f"\n{m.setup}: {format_count(trainable)} trainable parameters "
             f"({format_fraction(trainable / m.params)}), the rest frozen (no gradient, no optimizer state)"
             if trainable is not None and trainable != m.params and m.params else "")
    step = report.config.get("step")
    return Text.assemble(
        (m.name, "bold"),
        f" ({m.architecture}, {m.dtype}, {m.source}): {format_count(m.params)} parameters; {experts}"
        f"embedding + output {format_count(m.embedding_params)} ({format_fraction(m.embedding_fraction)}, {tied}); "
        f"hidden {m.hidden_size}, {m.num_layers} layers, {attention}vocab {m.vocab_size:,}",
        (setup, "bold"),
        f"\nstep: {step}" if step else "",
        (f"\nwarning: {m.warning}", "bold yellow") if m.warning else "",
    )


def strategy(config: dict) -> str:
    """The strategy as a title names it; hsdp with its shard groups."""
    shard = config.get("shard_size")
    groups = (config.get("gpus") or 1) // shard if shard else 1
    return f"hsdp: {groups} replicas x {shard} shards" if config.get("strategy") == Strategy.HSDP and shard else \
        str(config.get("strategy"))


def parts_text(parts: Sequence[StatePart], units: str) -> str:
    """'state by part: muon 6.48B params 25.90 GB, adamw 262.41M params 2.10 GB' (what each holds: in JSON)."""
    _, unit = UNITS[units]
    return "state by part: " + ", ".join(f"{part.name} {format_count(part.parameters)} params "
                                         f"{format_bytes(part.state_bytes, units)} {unit}" for part in parts) \
        if parts else ""


def status_cell(optimizer: str, status: Status, remarks: Sequence[str], notes: list[Text]) -> Text:
    """The status, with a numbered reference to a note below the table when the row has remarks."""
    cell = Text(status, style=STATUS_STYLE.get(status, ""))
    if any(remarks):
        notes.append(Text(f"[{len(notes) + 1}] {optimizer}: " + "; ".join(r for r in remarks if r), style="dim"))
        cell.append(f" [{len(notes)}]")
    return cell


def short_dtype(dtype: str) -> str:
    return dtype.replace("bfloat", "bf").replace("float", "fp").replace("uint", "u")


def with_interval(value: float | None, bounds: tuple[float, float] | None, scale: float, digits: int) -> str:
    """'2,861 ±6%': the median and the larger side of its 95% interval, relative (the bounds are in JSON)."""
    if value is None:
        return "-"
    text = f"{value * scale:,.{digits}f}"
    if bounds is None or not value:
        return text
    return f"{text} ±{100 * max(value - bounds[0], bounds[1] - value) / value:.0f}%"


def failure_line(optimizer: str, status: Status, reason: str | None) -> Text:
    return Text.assemble((f"{optimizer}: ", "bold"), (status, STATUS_STYLE.get(status, "")),
                         f" ({reason})" if reason else "")


def report_units(report: ModelReport, units: str | None = None) -> str:
    """The byte units a report's tables and plots use: --units, else GB or MB by its largest figure."""
    if units is not None:
        return units
    if isinstance(report, StateSizeReport):
        largest = max([report.reference_state_bytes or 0] + [row.state_bytes or 0 for row in report.results])
    elif isinstance(report, CompareReport):
        largest = max((row.peak_bytes or row.predicted_peak_bytes or 0 for row in report.results), default=0)
    elif isinstance(report, TuneReport):
        largest = max((row.state_bytes or 0 for row in report.results), default=0)
    else:  # predict and plan
        largest = max((getattr(row, "predicted_device_bytes", None) or 0 for row in report.rows()), default=0)
    return auto_units(largest)


def model_lines(report: ModelReport, models: list[tuple[str, ModelReport]] | None) -> list[Text]:
    """One line for the model; with several runs, one per run (labelled), or one when they share it."""
    if not models or len({r.model for _, r in models}) == 1:
        return [model_line(report)]
    return [Text.assemble((f"[{label}] ", "dim"), model_line(run)) for label, run in models]


PIPE_WIDTH = 120  # columns when writing to a pipe or file, where rich would otherwise assume 80


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else PIPE_WIDTH
    return Console(stderr=stderr, soft_wrap=False, width=width)


def show(renderable: Any) -> None:
    """Print to the terminal with every table fitted to its width (split, never cut: render/fit.py)."""
    from optprof.render.fit import fit_tables

    terminal = console()
    terminal.print(fit_tables(renderable, terminal))
