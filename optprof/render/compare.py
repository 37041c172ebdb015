"""compare reports as rich tables: measured memory, time and throughput per optimizer, and their notes."""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from optprof.measure.stats import is_different
from optprof.render.console import failure_line, parts_text, status_cell, strategy, units_note, with_interval
from optprof.results.reports import (
    CompareReport,
)
from optprof.results.rows import CompareRow
from optprof.results.vocab import BREAKDOWN_KEYS, Status
from optprof.units import (
    UNITS,
    format_bytes,
    format_fraction,
    format_ms,
    format_rate,
)


def _phase_split(row: CompareRow) -> str:
    """forward / backward / clip+optimizer as percentages of the mean step."""
    if row.forward_s is None or row.backward_s is None or row.optimizer_s is None:
        return "-"
    total = row.forward_s + row.backward_s + row.optimizer_s + (row.clip_s or 0.0)
    if not total:
        return "-"
    fwd, bwd = 100 * row.forward_s / total, 100 * row.backward_s / total
    return f"{fwd:.0f}/{bwd:.0f}/{100 - fwd - bwd:.0f}"


PEAK_LABELS = {"torch_max_reserved": "torch reserved", "tensor_peak": "live tensors", "rss_peak": "process RSS"}


def _compare_title(report: CompareReport, searched: bool) -> str:
    first = next((r for r in report.results if r.status == Status.OK), None)
    batch = "the largest micro-batch each fits" if searched else f"micro-batch {first.micro_batch if first else '-'}"
    shape = "" if first is None else (
        f" at {batch} x {first.seq_len} tokens"
        + (f" x {first.grad_accum} accumulated" if (first.grad_accum or 1) > 1 else ""))
    ranks = f", {first.world_size} ranks ({strategy(report.config)})" if first is not None and first.world_size > 1 \
        else ""
    return f"Training step, measured on {report.device.get('name') or 'the device'}{ranks}{shape}"


def _compare_columns(table: Table, unit: str, searched: bool, common: int | None, with_mfu: bool,
                     against: bool) -> None:
    table.add_column("optimizer", style="bold", no_wrap=True)
    vs = ("vs\nAdamW",) if against else ()
    columns = [f"state\n{unit}", f"peak\n{unit}", *(("max\nµbatch", "probes") if searched else ()),
               "tokens/s\n± 95%", *vs, *((f"tokens/s\nat µb {common or '-'}",) if searched else ()),
               "opt. step\nms ± 95%", *vs, "fwd/bwd/opt\n% of step", *(("MFU",) if with_mfu else ())]
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)


def _versus(row: CompareRow, reference: CompareRow | None, value: str, interval: str, ratio: bool,
            drift: float = 0.0) -> str:
    """The row against AdamW: '≈' where the difference's 95% interval includes zero, or where the change is
    within the drift between trials; else the change."""
    if reference is None or row is reference:
        return "-" if reference is None else "ref."
    ours, theirs = getattr(row, value), getattr(reference, value)
    different = is_different(getattr(row, interval), getattr(reference, interval))
    if different is None or ours is None or not theirs:
        return "-"
    if not different or abs(ours / theirs - 1) <= drift:
        return "≈"
    return f"{ours / theirs:.2f}x" if ratio else f"{100 * (ours / theirs - 1):+.1f}%"


def _breakdown_table(unit: str) -> Table:
    table = Table(title=f"Peak memory by category ({unit}), from one tracked step; and the process's RSS",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    table.add_column("optimizer", style="bold", no_wrap=True)
    for key in ("parameters", "gradients", "optimizer state", "activations", "temporaries", "live peak",
                "process RSS"):
        table.add_column(key, justify="right", no_wrap=True)
    return table


def _reference(report: CompareReport) -> CompareRow | None:
    """AdamW's row (the first run's, with several runs side by side), when it was measured."""
    return next((r for r in report.results if r.status == Status.OK and r.optimizer.split(" (")[0] == "adamw"), None)


def compare_table(report: CompareReport, units: str) -> Group:
    unit = UNITS[units][1]
    searched = any(row.max_micro_batch is not None for row in report.results)
    common = next((r.common_micro_batch for r in report.results if r.common_micro_batch), None)
    with_mfu = any(row.mfu is not None for row in report.results)
    reference = _reference(report)
    table = Table(title=_compare_title(report, searched), title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, padding=(0, 1))
    _compare_columns(table, unit, searched, common, with_mfu, reference is not None)
    breakdown = _breakdown_table(unit)
    notes: list[Text] = []
    for row in report.results:
        short = _shortfall(row, units)
        remarks = [row.reason or "", short, row.settings or "", parts_text(row.state_parts, units), *row.notes]
        status = status_cell(row.optimizer, row.status, remarks, notes)
        largest, trials, at_common = _search_cells(row)
        tokens_vs = (_versus(row, reference, "tokens_per_s", "tokens_per_s_ci95", False,
                             report.fwd_bwd_spread or 0.0),) if reference else ()
        step_vs = (_versus(row, reference, "optimizer_step_s", "optimizer_step_s_ci95", True),) if reference else ()
        table.add_row(
            row.optimizer, format_bytes(row.state_bytes, units), format_bytes(row.peak_bytes, units),
            *((largest, trials) if searched else ()), with_interval(row.tokens_per_s, row.tokens_per_s_ci95, 1, 0),
            *tokens_vs, *((at_common,) if searched else ()),
            with_interval(row.optimizer_step_s, row.optimizer_step_s_ci95, 1000, 1), *step_vs,
            _phase_split(row), *((format_fraction(row.mfu),) if with_mfu else ()), status,
        )
        if row.breakdown:
            categories = [row.breakdown.get(k) for k in BREAKDOWN_KEYS]
            breakdown.add_row(row.optimizer, *(format_bytes(c, units) for c in categories),
                              format_bytes(row.tensor_peak_bytes, units), format_bytes(row.rss_peak_bytes, units))
    if searched:
        limit = next((r.memory_limit_bytes for r in report.results if r.memory_limit_bytes), None)
        notes.insert(0, Text(
            f"max µbatch: the largest micro-batch whose step fits {format_bytes(limit, units)} {unit}, found by probe "
            "trials (each a fresh process); the other columns are measured at that size. tokens/s at µb "
            f"{common or '-'}: at the largest micro-batch every optimizer fits.", style="dim"))
    parts: list[RenderableType] = [table, _compare_legend(report, units)]
    if breakdown.row_count:
        parts.append(breakdown)
    return Group(*parts, *_prediction_notes(report, units), *_routing_notes(report), *_derived_notes(report), *notes)


def _routing_notes(report: CompareReport) -> list[Text]:
    loads = [f"{row.optimizer} {row.expert_load:.2f}x" for row in report.results if row.expert_load is not None]
    if not loads:
        return []
    return [Text("Routing seen (mixture of experts): the busiest expert's tokens over the mean, worst layer, "
                 f"timed steps (1.00x = balanced): {', '.join(loads)}. The memory of transformers' grouped "
                 "experts does not depend on it: every tensor has tokens x top-k rows.", style="dim")]


def _compare_legend(report: CompareReport, units: str) -> Text:
    sources = sorted({PEAK_LABELS.get(r.peak_source or "", "") for r in report.results if r.peak_source})
    ranks = max((r.world_size for r in report.results), default=1)
    folded = "" if ranks == 1 else (
        f" {ranks} ranks fold into each row: tokens/s and energy summed, peaks the largest rank's, times the "
        "slowest rank's, state the unsharded total (each rank's own figures and the rules are in --format json).")
    return Text(
        f"{units_note(units)}. peak: {', '.join(sources) or 'none measured'} (the device's best figure; every "
        "source is in --format json). tokens/s: global, micro-batch x sequence x accumulation x ranks / median "
        "step. opt. step: optimizer.step() + zero_grad(), repeated on one set of gradients after the timed steps "
        "(median). ± 95%: the wider side of the median's distribution-free 95% interval (order statistics; both "
        "bounds in --format json). vs AdamW: ≈ where the "
        "difference's 95% interval includes zero, a difference this measurement does not support; for tokens/s "
        f"also where it is within the drift between trials ({_drift(report)}). "
        "fwd/bwd/opt: mean phase times, optimizer = step() + zero_grad() (and clipping)." + folded,
        style="dim",
    )


def _drift(report: CompareReport) -> str:
    if report.fwd_bwd_spread is None:
        return "not measured: one trial"
    return (f"forward + backward, the same work for every optimizer, took up to {100 * report.fwd_bwd_spread:.1f}% "
            "longer in one trial than in another")


MEASURED_LABELS = {"tensor_peak_bytes": "live tensors", "torch_max_allocated_bytes": "allocated",
                   "torch_max_reserved_bytes": "reserved", "nvml_process_peak_bytes": "NVML process, vs + reserve"}


def _shortfall(row: CompareRow, units: str) -> str:
    """How far a row that does not fit is from fitting: predicted need and what is available, when it was
    decided before launch; else how far micro-batch 1's measured peak was over the limit."""
    unit = UNITS[units][1]
    if row.status == Status.NO_FIT and row.predicted_peak_bytes is not None and row.memory_limit_bytes is not None:
        return (f"predicted need {format_bytes(row.predicted_peak_bytes, units)} {unit} per rank, "
                f"{format_bytes(row.memory_limit_bytes, units)} {unit} available")
    return f"short by {format_bytes(row.short_by_bytes, units)} {unit}" if row.short_by_bytes else ""


def _prediction_notes(report: CompareReport, units: str) -> list[Text]:
    """Each row's predicted peak (fake tensors) against what was measured: how good the predictor is here."""
    unit = UNITS[units][1]
    lines = []
    for row in report.results:
        if row.predicted_peak_bytes is None or row.status != Status.OK:  # a row decided before launch: nothing measured
            continue
        errors = ", ".join(f"{MEASURED_LABELS.get(name, name)} {100 * error:+.2f}%"
                           for name, error in row.prediction_errors.items() if name != "step_s")
        search = "" if row.predicted_max_micro_batch is None or row.max_micro_batch is None else (
            f"; predicted max µbatch {row.predicted_max_micro_batch}, found {row.max_micro_batch}")
        lines.append(f"{row.optimizer} {format_bytes(row.predicted_peak_bytes, units)} {unit} ({errors}){search}")
    times = [f"{row.optimizer} {format_ms(row.predicted_step_s)} ms ({100 * row.prediction_errors['step_s']:+.1f}%)"
             for row in report.results if row.predicted_step_s is not None and "step_s" in row.prediction_errors]
    notes = [] if not lines else [Text("Predicted peak (fake tensors) against the measured one, error = predicted / "
                                       "measured - 1: " + "; ".join(lines) + ".", style="dim")]
    if times:
        notes.append(Text(f"Predicted step time (--gpu {report.config.get('gpu', '')}) against the measured median: "
                          + "; ".join(times) + ".", style="dim"))
    return notes


def _derived_notes(report: CompareReport) -> list[Text]:
    derived = {name: how for row in report.results for name, how in row.derived.items()}
    return [Text(f"Derived, not measured: {name}: {how}.", style="dim") for name, how in derived.items()]


def _search_cells(row: CompareRow) -> tuple[str, str, str]:
    if row.max_micro_batch is None:
        return "-", "-", "-"
    largest = f"{row.max_micro_batch}{'+' if row.max_micro_batch_capped else ''}"
    if row.micro_batch is not None and row.micro_batch != row.max_micro_batch and row.max_micro_batch:
        largest += f" (used {row.micro_batch})"  # --search-margin chose a smaller size
    return largest, str(row.trials), format_rate(row.tokens_per_s_at_common)


def trial_line(row: CompareRow, units: str = "mb") -> Text:
    """One line per finished trial, printed while the others run."""
    if row.status != Status.OK:
        short = _shortfall(row, units)
        return failure_line(row.optimizer, row.status, f"{row.reason}; {short}" if short else row.reason)
    search = "" if row.max_micro_batch is None else (
        f"max micro-batch {row.max_micro_batch} ({row.trials} probe trials), ")
    return Text.assemble(
        (f"{row.optimizer}: ", "bold"),
        search,
        f"{format_rate(row.tokens_per_s)} tokens/s, step {format_ms(row.step_s_p50)} ms, "
        f"state {format_bytes(row.state_bytes, units)} {UNITS[units][1]}, "
        f"peak {format_bytes(row.peak_bytes, units)} {UNITS[units][1]}",
    )
