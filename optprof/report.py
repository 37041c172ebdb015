"""Results -> text. The only module that imports rich and the only one that formats units."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from optprof.results import METHOD_META_STEP

if TYPE_CHECKING:
    from optprof.results import StateSizeReport

UNITS = {"gb": (1e9, "GB"), "gib": (2**30, "GiB")}
STATUS_STYLE = {"ok": "green", "failed": "bold red", "unavailable": "yellow"}


def format_bytes(n: int | None, units: str = "gb") -> str:
    if n is None:
        return "-"
    scale, _ = UNITS[units]
    value = n / scale
    return f"{value:,.2f}" if value >= 0.01 or n == 0 else f"{value:.2e}"


def format_count(n: int | None) -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:,.2f}{suffix}"
    return str(n)


def format_fraction(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _units_note(units: str) -> str:
    return "GB = 10^9 bytes" if units == "gb" else "GiB = 2^30 bytes"


def model_line(report: StateSizeReport) -> Text:
    m = report.model
    tied = "tied" if m.tied_embeddings else "untied"
    return Text.assemble(
        (m.name, "bold"),
        f" ({m.architecture}, {m.dtype}, {m.source}): {format_count(m.params)} parameters; "
        f"embedding + output {format_count(m.embedding_params)} ({format_fraction(m.embedding_fraction)}, {tied}); "
        f"hidden {m.hidden_size}, {m.num_layers} layers, {m.num_heads} heads / {m.num_kv_heads} kv, "
        f"head dim {m.head_dim}, vocab {m.vocab_size:,}",
    )


def state_size_table(report: StateSizeReport, units: str = "gb") -> Table:
    _, unit = UNITS[units]
    table = Table(
        title="Optimizer state, measured: one real step on the meta device",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
    )
    table.add_column("optimizer", style="bold", no_wrap=True)
    table.add_column(f"state\n{unit}", justify="right", no_wrap=True)
    table.add_column("bytes\n/param", justify="right", no_wrap=True)
    table.add_column("vs\nAdamW", justify="right", no_wrap=True)
    table.add_column("2nd\nmoment", justify="right", no_wrap=True)
    table.add_column("Adam v\nremoved", justify="right", no_wrap=True)
    table.add_column("dtype", no_wrap=True)
    table.add_column("status", no_wrap=True)
    notes: list[Text] = []
    for row in report.results:
        vs = "-" if row.saving_vs_adamw is None else f"{round(-100 * row.saving_vs_adamw, 1) + 0.0:+.1f}%"
        status = Text(row.status, style=STATUS_STYLE.get(row.status, ""))
        remarks = [row.reason or "", row.settings or "", "" if row.method in (None, METHOD_META_STEP) else row.method]
        if any(remarks):
            remark = "; ".join(r for r in remarks if r)
            notes.append(Text(f"[{len(notes) + 1}] {row.optimizer}: {remark}", style="dim"))
            status.append(f" [{len(notes)}]")
        table.add_row(
            row.optimizer,
            format_bytes(row.state_bytes, units),
            "-" if row.bytes_per_param is None else f"{row.bytes_per_param:.3f}",
            vs,
            format_count(row.second_moment_entries),
            format_fraction(row.second_moment_removed),
            "+".join(_short_dtype(dtype) for dtype in row.state_dtypes) or "-",
            status,
        )
    legend = Text(
        f"{_units_note(units)}. vs AdamW: change against AdamW measured in the same run. 2nd moment: "
        "adaptive learning rates (second-moment entries) kept; Adam v removed: share of Adam's one per "
        "parameter gone.",
        style="dim",
    )
    return Group(table, legend, *notes)


def _short_dtype(dtype: str) -> str:
    return dtype.replace("bfloat", "bf").replace("float", "fp").replace("uint", "u")


def render_state_size(report: StateSizeReport, units: str = "gb") -> Group:
    return Group(model_line(report), state_size_table(report, units))


@dataclass(frozen=True)
class OptimizerListing:
    """One row of `optprof optimizers`, plain data so the CLI can also print it as JSON."""

    name: str
    package: str
    version: str | None
    family: str
    available: bool
    reason: str | None
    description: str


def optimizers_table(rows: Sequence[OptimizerListing], chains: Sequence[Sequence[str]]) -> Group:
    table = Table(title="Optimizers optprof can profile")
    for column in ("name", "package", "family", "available here", "description"):
        table.add_column(column, style="bold" if column == "name" else "")
    for row in rows:
        available = Text("yes", style="green") if row.available else Text(f"no: {row.reason}", style="yellow")
        table.add_row(row.name, f"{row.package} {row.version or ''}".strip(), row.family, available,
                      row.description)
    lines = [Text("Inclusion relations (optimizer study): A ⊆ B means B reduces to A for some hyperparameters")]
    lines += [Text("  " + " ⊆ ".join(chain)) for chain in chains]
    lines.append(Text("Any other optimizer: -o package.module:ClassName [--opt-arg key=value ...]", style="dim"))
    return Group(table, *lines)


def models_table(rows: Sequence[tuple[str, str, Sequence[str]]]) -> Table:
    table = Table(title="Bundled model configs (no weights): use the name or any alias as MODEL")
    table.add_column("name", style="bold")
    table.add_column("description")
    table.add_column("aliases")
    for name, description, aliases in rows:
        table.add_row(name, description, ", ".join(aliases) or "-")
    return table


PIPE_WIDTH = 120  # columns when writing to a pipe or file, where rich would otherwise assume 80


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else PIPE_WIDTH
    return Console(stderr=stderr, soft_wrap=False, width=width)
