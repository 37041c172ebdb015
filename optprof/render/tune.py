"""tune reports as rich tables: each optimizer's best and spread, the inclusion checks, the ranking by budget."""

from __future__ import annotations

import math

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from optprof.render.console import status_cell, units_note, with_interval
from optprof.results.reports import (
    TuneReport,
)
from optprof.results.rows import TuneRow
from optprof.results.vocab import Status
from optprof.units import (
    UNITS,
    format_bytes,
)

SHORT_NAMES = {"momentum": "mom", "alpha": "α", "beta1": "β1", "beta2": "β2", "eps": "ε", "weight_decay": "wd"}


def hyperparameters_text(values: dict[str, float] | None) -> str:
    """'lr 0.0042, β1 0.957, β2 0.99962': three significant digits; two of 1 - x for values near 1 (so
    that 0.9996 does not read as 1), the names short."""
    if not values:
        return "-"

    def shown(value: float) -> str:
        if 0.9 < value < 1:
            return f"{value:.{1 - math.floor(math.log10(1 - value))}f}"
        return f"{value:.3g}"

    return ", ".join(f"{SHORT_NAMES.get(name, name)} {shown(value)}" for name, value in values.items())


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _tune_title(report: TuneReport) -> str:
    c = report.config
    return (f"Quality at equal budget: {c.get('trials')} trials per optimizer, each {c.get('steps')} steps of "
            f"{c.get('micro_batch')} x {c.get('seq_len')} tokens; held-out loss in nats per token (lower is better)")


def _tune_row_cells(row: TuneRow, units: str) -> list[str]:
    spread = ("-" if row.median_val_loss is None else
              f"{_loss(row.median_val_loss)} [{_loss(row.val_loss_p25)}, {_loss(row.val_loss_p75)}]")
    ran = [t for t in row.trials if t.status == Status.OK]
    diverged = f"{sum(t.diverged for t in ran)}/{len(ran)}" if ran else "-"
    return [_loss(row.best_val_loss), _loss(row.noise_range), hyperparameters_text(row.best_hyperparameters),
            spread, diverged, with_interval(row.tokens_per_s, row.tokens_per_s_ci95, 1.0, 0),
            format_bytes(row.state_bytes, units)]


def tune_table(report: TuneReport, units: str) -> Group:
    unit = UNITS[units][1]
    table = Table(title=_tune_title(report), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  padding=(0, 1))
    table.add_column("optimizer", style="bold", no_wrap=True)
    for column in ("best\nloss", "seed\nrange", "best hyperparameters", "median\n[p25, p75]", "diverged",
                   "tokens/s\n± 95%", f"state\n{unit}"):
        table.add_column(column, justify="left" if column == "best hyperparameters" else "right")
    table.add_column("status", no_wrap=True)
    notes: list[Text] = []
    for row in report.results:
        unstable = (f"its best point diverged with {row.noise_diverged} of {len(row.noise_seeds)} other seeds "
                    "(the seed range leaves those out)" if row.noise_diverged else "")
        table.add_row(row.optimizer, *_tune_row_cells(row, units),
                      status_cell(row.optimizer, row.status, [row.reason or "", unstable], notes))
    c = report.corpus
    legend = Text(
        f"{units_note(units)}. Corpus: {c.source}; {c.train_documents} documents ({c.train_tokens:,} tokens) "
        f"to train on, {c.held_out_documents} ({c.held_out_tokens:,}) held out. seed range: the best point's "
        "held-out loss over its seed and the noise seeds (max - min). median: over every trial, a diverged one at "
        "its first loss.", style="dim")
    return Group(table, legend, *notes, _inclusion_table(report), _budget_table(report),
                 *(Text(f"- {note}", style="dim") for note in report.notes))


def _inclusion_table(report: TuneReport) -> Table | Text:
    if not report.inclusion:
        return Text("Inclusion checks: none (they need both optimizers of a relation, e.g. sgd and momentum)",
                    style="dim")
    table = Table(title="Inclusion (the study: a more general optimizer, tuned as much, never does worse than its "
                  "special case)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for column in ("special ⊆ general", "special\nbest", "general\nbest", "gap", "noise\nmargin", "holds"):
        table.add_column(column, justify="left" if column in ("special ⊆ general", "holds") else "right",
                         no_wrap=True)
    for check in report.inclusion:
        if check.holds is None:
            verdict = Text("- (no best loss)", style="dim")
        elif check.gap is not None and check.gap <= 0:
            verdict = Text("yes", style="green")
        elif check.holds:
            verdict = Text("yes, within noise", style="green")
        else:
            verdict = Text("no: violated", style="bold red")
        gap = "-" if check.gap is None else f"{check.gap:+.3f}"
        table.add_row(f"{check.special} ⊆ {check.general}", _loss(check.special_best), _loss(check.general_best),
                      gap, _loss(check.margin), verdict)
    return table


def _budget_table(report: TuneReport) -> Table | Text:
    if not report.ranking_by_budget:
        return Text("Ranking by budget: no optimizer trained", style="dim")
    table = Table(title="Ranking by the best loss expected after k trials (averaged over every order of the "
                  "trials)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    table.add_column("k", justify="right", no_wrap=True)
    table.add_column("best first (expected best loss)")
    for budget in report.ranking_by_budget:
        order = " < ".join(f"{name} {budget.expected_best_val_loss[name]:.3f}" for name in budget.ranking)
        table.add_row(str(budget.trials), order)
    return table
