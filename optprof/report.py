"""Results -> text. The only module that imports rich and the only one that formats units."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from optprof.baseline import MEASURES
from optprof.measure.stats import is_different
from optprof.results import (
    BREAKDOWN_KEYS,
    EXTRAPOLATED,
    METHOD_FSDP_FAKE,
    METHOD_META_STEP,
    CheckReport,
    CompareReport,
    CompareRow,
    ModelReport,
    ModelsReport,
    OptimizerListing,
    OptimizersReport,
    PredictReport,
    PredictRow,
    Report,
    StatePart,
    StateSizeReport,
    TuneReport,
    TuneRow,
)
from optprof.units import (
    UNIT_NOTES,
    UNITS,
    auto_units,
    format_bytes,
    format_count,
    format_fraction,
    format_measure,
    format_ms,
    format_rate,
)

STATUS_STYLE = {"ok": "green", "failed": "bold red", "unavailable": "yellow", "unsupported": "yellow", "oom": "magenta"}


def _units_note(units: str) -> str:
    return UNIT_NOTES[units]


def model_line(report: ModelReport) -> Text:
    m = report.model
    tied = "tied" if m.tied_embeddings else "untied"
    attention = (f"{m.num_heads} heads / {m.num_kv_heads} kv, head dim {m.head_dim}, " if m.num_heads
                 else "no attention, ")
    experts = (f"{m.num_experts} experts, {m.experts_per_token} per token: {format_count(m.active_params)} "
               "parameters active per token; " if m.num_experts else "")
    trains = m.trainable_params is not None and m.trainable_params != m.params
    setup = (f"\n{m.setup}: {format_count(m.trainable_params)} trainable parameters "
             f"({format_fraction(m.trainable_params / m.params)}), the rest frozen (no gradient, no optimizer state)"
             if trains and m.params else "")
    return Text.assemble(
        (m.name, "bold"),
        f" ({m.architecture}, {m.dtype}, {m.source}): {format_count(m.params)} parameters; {experts}"
        f"embedding + output {format_count(m.embedding_params)} ({format_fraction(m.embedding_fraction)}, {tied}); "
        f"hidden {m.hidden_size}, {m.num_layers} layers, {attention}vocab {m.vocab_size:,}",
        (setup, "bold"),
    )


def _strategy(config: dict) -> str:
    """The strategy as a title names it; hsdp with its shard groups."""
    shard = config.get("shard_size")
    groups = (config.get("gpus") or 1) // shard if shard else 1
    return f"hsdp: {groups} replicas x {shard} shards" if config.get("strategy") == "hsdp" and shard else \
        str(config.get("strategy"))


def state_size_table(report: StateSizeReport, units: str = "gb") -> Table:
    _, unit = UNITS[units]
    ranks = report.config.get("gpus") or 1
    where = "one real step on the meta device" if ranks == 1 else (
        f"per rank of {ranks} ({_strategy(report.config)}), FSDP2 sharding on fake tensors (the logical "
        "total is in --format json)")
    table = Table(
        title=f"Optimizer state, measured: {where}",
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
        method = (row.method or "").replace(f", {EXTRAPOLATED}", "")  # said once, under the table
        method = "" if method in ("", METHOD_META_STEP, METHOD_FSDP_FAKE) else method
        remarks = [row.reason or "", row.settings or "", _parts_text(row.state_parts, units), method]
        status = _status_cell(row.optimizer, row.status, remarks, notes)
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
        "trainable parameter gone; bytes/param: per trainable parameter.",
        style="dim",
    )
    extrapolated = [row.optimizer for row in report.results if EXTRAPOLATED in (row.method or "")]
    if extrapolated:
        notes.insert(0, Text(
            f"{'Every row' if len(extrapolated) == len(report.results) else ', '.join(extrapolated)}: stepped on "
            f"copies of the model's first 1, 2 and 3 layers and extrapolated to its {report.model.num_layers}: "
            "the copies' parameters add up to the model's, and every figure was checked affine in the layer count "
            "(exact; --full-model steps the whole model).", style="dim"))
    return Group(table, legend, *notes)


def _parts_text(parts: Sequence[StatePart], units: str) -> str:
    """'state by part: muon 6.48B params 25.90 GB, adamw 262.41M params 2.10 GB' (what each holds: in JSON)."""
    _, unit = UNITS[units]
    return "state by part: " + ", ".join(f"{part.name} {format_count(part.parameters)} params "
                                         f"{format_bytes(part.state_bytes, units)} {unit}" for part in parts) \
        if parts else ""


def _status_cell(optimizer: str, status: str, remarks: Sequence[str], notes: list[Text]) -> Text:
    """The status, with a numbered reference to a note below the table when the row has remarks."""
    cell = Text(status, style=STATUS_STYLE.get(status, ""))
    if any(remarks):
        notes.append(Text(f"[{len(notes) + 1}] {optimizer}: " + "; ".join(r for r in remarks if r), style="dim"))
        cell.append(f" [{len(notes)}]")
    return cell


def _short_dtype(dtype: str) -> str:
    return dtype.replace("bfloat", "bf").replace("float", "fp").replace("uint", "u")


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
    first = next((r for r in report.results if r.status == "ok"), None)
    batch = "the largest micro-batch each fits" if searched else f"micro-batch {first.micro_batch if first else '-'}"
    shape = "" if first is None else (
        f" at {batch} x {first.seq_len} tokens"
        + (f" x {first.grad_accum} accumulated" if (first.grad_accum or 1) > 1 else ""))
    ranks = f", {first.world_size} ranks ({_strategy(report.config)})" if first is not None and first.world_size > 1 \
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


def _with_interval(value: float | None, bounds: tuple[float, float] | None, scale: float, digits: int) -> str:
    """'2,861 ±6%': the median and the larger side of its 95% interval, relative (the bounds are in JSON)."""
    if value is None:
        return "-"
    text = f"{value * scale:,.{digits}f}"
    if bounds is None or not value:
        return text
    return f"{text} ±{100 * max(value - bounds[0], bounds[1] - value) / value:.0f}%"


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
    return next((r for r in report.results if r.status == "ok" and r.optimizer.split(" (")[0] == "adamw"), None)


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
        remarks = [row.reason or "", short, row.settings or "", _parts_text(row.state_parts, units), *row.notes]
        status = _status_cell(row.optimizer, row.status, remarks, notes)
        largest, trials, at_common = _search_cells(row)
        tokens_vs = (_versus(row, reference, "tokens_per_s", "tokens_per_s_ci95", False,
                             report.fwd_bwd_spread or 0.0),) if reference else ()
        step_vs = (_versus(row, reference, "optimizer_step_s", "optimizer_step_s_ci95", True),) if reference else ()
        table.add_row(
            row.optimizer, format_bytes(row.state_bytes, units), format_bytes(row.peak_bytes, units),
            *((largest, trials) if searched else ()), _with_interval(row.tokens_per_s, row.tokens_per_s_ci95, 1, 0),
            *tokens_vs, *((at_common,) if searched else ()),
            _with_interval(row.optimizer_step_s, row.optimizer_step_s_ci95, 1000, 1), *step_vs,
            _phase_split(row), *((format_fraction(row.mfu),) if with_mfu else ()), status,
        )
        if row.breakdown:
            parts = [row.breakdown.get(k) for k in BREAKDOWN_KEYS]
            breakdown.add_row(row.optimizer, *(format_bytes(p, units) for p in parts),
                              format_bytes(row.tensor_peak_bytes, units), format_bytes(row.rss_peak_bytes, units))
    if searched:
        limit = next((r.memory_limit_bytes for r in report.results if r.memory_limit_bytes), None)
        notes.insert(0, Text(
            f"max µbatch: the largest micro-batch whose step fits {format_bytes(limit, units)} {unit}, found by probe "
            "trials (each a fresh process); the other columns are measured at that size. tokens/s at µb "
            f"{common or '-'}: at the largest micro-batch every optimizer fits.", style="dim"))
    parts: list = [table, _compare_legend(report, units)]
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
        f"{_units_note(units)}. peak: {', '.join(sources) or 'none measured'} (the device's best figure; every "
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
    if row.status == "does not fit" and row.predicted_peak_bytes is not None and row.memory_limit_bytes is not None:
        return (f"predicted need {format_bytes(row.predicted_peak_bytes, units)} {unit} per rank, "
                f"{format_bytes(row.memory_limit_bytes, units)} {unit} available")
    return f"short by {format_bytes(row.short_by_bytes, units)} {unit}" if row.short_by_bytes else ""


def _prediction_notes(report: CompareReport, units: str) -> list[Text]:
    """Each row's predicted peak (fake tensors) against what was measured: how good the predictor is here."""
    unit = UNITS[units][1]
    lines = []
    for row in report.results:
        if row.predicted_peak_bytes is None or row.status != "ok":  # a row decided before launch: nothing measured
            continue
        errors = ", ".join(f"{MEASURED_LABELS.get(name, name)} {100 * error:+.2f}%"
                           for name, error in row.prediction_errors.items())
        search = "" if row.predicted_max_micro_batch is None or row.max_micro_batch is None else (
            f"; predicted max µbatch {row.predicted_max_micro_batch}, found {row.max_micro_batch}")
        lines.append(f"{row.optimizer} {format_bytes(row.predicted_peak_bytes, units)} {unit} ({errors}){search}")
    if not lines:
        return []
    return [Text("Predicted peak (fake tensors) against the measured one, error = predicted / measured - 1: "
                 + "; ".join(lines) + ".", style="dim")]


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


def predict_table(report: PredictReport, units: str) -> Group:
    _, unit = UNITS[units]
    first = next((r for r in report.results if r.status == "ok"), None)
    config = report.config
    ranks = f", per rank of {config['gpus']} ({_strategy(config)})" if config.get("gpus", 1) > 1 else ""
    shape = "" if first is None else f" at micro-batch {first.micro_batch} x {first.seq_len} tokens"
    memory = config.get("gpu_memory_bytes")
    table = Table(title=f"PREDICTED for {config['target_device']}{shape}{ranks}: fake tensors, nothing allocated",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    table.add_column("optimizer", style="bold", no_wrap=True)
    table.add_column(f"state\n{unit}", justify="right", no_wrap=True)
    for key in ("params", "grads", "activations", "temps"):
        table.add_column(f"{key}\n{unit}", justify="right", no_wrap=True)
    table.add_column(f"predicted\npeak {unit}", justify="right", no_wrap=True)
    table.add_column(f"+ reserve\n{unit}", justify="right", no_wrap=True)
    if memory is not None:
        table.add_column("predicted max\nµbatch", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    notes: list[Text] = []
    for row in report.results:
        status = _status_cell(row.optimizer, row.status, [row.reason or "", row.settings or ""], notes)
        parts = [row.predicted_breakdown.get(k) for k in BREAKDOWN_KEYS if k != "optimizer_state"]
        largest = "-" if row.predicted_max_micro_batch is None else (
            f"{row.predicted_max_micro_batch}{'+' if row.predicted_max_capped else ''}")
        table.add_row(
            row.optimizer,
            format_bytes(row.state_bytes, units),
            *(format_bytes(p, units) for p in parts),
            format_bytes(row.predicted_peak_bytes, units),
            format_bytes(row.predicted_device_bytes, units),
            *((largest,) if memory is not None else ()),
            status,
        )
    reserve = format_bytes(config.get("reserve_bytes"), units)
    legend = Text(
        f"{_units_note(units)}. Breakdown at the predicted peak (state: the real optimizer's, exact). + reserve: "
        f"the peak plus {reserve} {unit} that tensors do not show."
        + ("" if memory is None else f" predicted max µbatch: the largest whose peak + reserve fits "
           f"{format_bytes(memory, units)} {unit}."),
        style="dim",
    )
    assumptions = [Text("Assumed: " + a, style="dim") for a in report.assumptions]
    return Group(table, legend, *notes, *assumptions)


def _failure_line(optimizer: str, status: str, reason: str | None) -> Text:
    return Text.assemble((f"{optimizer}: ", "bold"), (status, STATUS_STYLE.get(status, "")),
                         f" ({reason})" if reason else "")


def prediction_line(row: PredictRow, units: str = "gb") -> Text:
    if row.status != "ok":
        return _failure_line(row.optimizer, row.status, row.reason)
    largest = "" if row.predicted_max_micro_batch is None else (
        f", predicted max micro-batch {row.predicted_max_micro_batch}")
    took = "" if row.predict_s is None else f" ({row.predict_s:.1f} s)"
    return Text.assemble((f"{row.optimizer}: ", "bold"),
                         f"predicted peak {format_bytes(row.predicted_peak_bytes, units)} {UNITS[units][1]}"
                         f"{largest}{took}")


VERDICT_STYLE = {"ok": "green", "regression": "bold red", "missing": "bold red", "improved": "cyan",
                 "skipped": "yellow"}


def check_table(report: CheckReport) -> Group:
    table = Table(title="optprof check: footprints against their profiles", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for column in ("profile", "optimizer", "measure", "expected", "actual", "change", "tol.", "verdict"):
        table.add_column(column, no_wrap=True,
                         justify="right" if column in ("expected", "actual", "change", "tol.") else "left")
    previous = None
    for v in report.verdicts:
        verdict = Text(v.verdict + (f" ({v.note})" if v.note else ""), style=VERDICT_STYLE.get(v.verdict, ""))
        name = os.path.splitext(os.path.basename(v.profile))[0]
        is_bytes = MEASURES[v.measure].is_bytes if v.measure in MEASURES else v.measure.endswith("_bytes")
        table.add_row(
            name if v.profile != previous else "", v.optimizer, v.measure,
            format_measure(is_bytes, v.expected), format_measure(is_bytes, v.actual),
            "-" if v.change is None else f"{100 * v.change:+.3f}%", f"{100 * v.tolerance:g}%", verdict,
        )
        previous = v.profile
    counts: dict[str, int] = {}
    for v in report.verdicts:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    result = "FAILED" if report.failed else "passed"
    lines = [Text(f"{result}: {summary}. Bytes and peaks fail when they grow past the tolerance, tokens/s when it "
                  "falls below it; an improvement past the tolerance fails only with --strict "
                  "(refresh the baseline with --update).", style="bold red" if report.failed else "green")]
    lines += [Text(f"updated {path}: {n} values", style="dim") for path, n in report.updated.items()]
    return Group(table, *lines)


def trial_line(row: CompareRow, units: str = "mb") -> Text:
    """One line per finished trial, printed while the others run."""
    if row.status != "ok":
        short = _shortfall(row, units)
        return _failure_line(row.optimizer, row.status, f"{row.reason}; {short}" if short else row.reason)
    search = "" if row.max_micro_batch is None else (
        f"max micro-batch {row.max_micro_batch} ({row.trials} probe trials), ")
    return Text.assemble(
        (f"{row.optimizer}: ", "bold"),
        search,
        f"{format_rate(row.tokens_per_s)} tokens/s, step {format_ms(row.step_s_p50)} ms, "
        f"state {format_bytes(row.state_bytes, units)} {UNITS[units][1]}, "
        f"peak {format_bytes(row.peak_bytes, units)} {UNITS[units][1]}",
    )


SUPPORT_STYLE = {"ok": "green", "unsupported": "yellow", "unavailable": "dim", "failed": "red"}


def _support_cell(row: OptimizerListing) -> Text:
    """yes, or the status; the reasons follow the table, where they have its full width."""
    if row.support == "unavailable":
        return Text("-", style="dim")  # the column before says why
    return Text("yes" if row.support == "ok" else str(row.support), style=SUPPORT_STYLE.get(row.support or "", ""))


def optimizers_table(report: OptimizersReport) -> Group:
    table = Table(title="Optimizers optprof can profile")
    under = (f"runs under {report.strategy}",) if report.strategy else ()
    for column in ("name", "package", "family", "available here", *under, "description"):
        table.add_column(column, style="bold" if column == "name" else "")
    for row in report.optimizers:
        available = Text("yes", style="green") if row.available else Text(f"no: {row.reason}", style="yellow")
        support = (_support_cell(row),) if report.strategy else ()
        table.add_row(row.name, f"{row.package} {row.version or ''}".strip(), row.family, available, *support,
                      row.description)
    lines: list[Text] = []
    if report.strategy:
        groups = f" in shard groups of {report.support_shard_size}" if report.support_shard_size else ""
        lines.append(Text(f"runs under {report.strategy}: one training step of {report.support_model} on fake "
                          f"tensors over {report.support_ranks} fake ranks{groups} (cached per installed versions); "
                          "compare decides the same way for its own model before launching ranks", style="dim"))
        lines += [Text(f"  {row.name}: {row.support_reason}", style=SUPPORT_STYLE.get(row.support or "", ""))
                  for row in report.optimizers if row.support not in ("ok", "unavailable")]
    lines.append(Text("Inclusion relations (optimizer study): A ⊆ B means B reduces to A for some hyperparameters"))
    lines += [Text("  " + " ⊆ ".join(chain)) for chain in report.inclusion_chains]
    lines.append(Text("Any other optimizer: -o package.module:ClassName [--opt-arg key=value ...]", style="dim"))
    return Group(table, *lines)


# ------------------------------------------------------------------------------------------------ tune

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
    ran = [t for t in row.trials if t.status == "ok"]
    diverged = f"{sum(t.diverged for t in ran)}/{len(ran)}" if ran else "-"
    return [_loss(row.best_val_loss), _loss(row.noise_range), hyperparameters_text(row.best_hyperparameters),
            spread, diverged, _with_interval(row.tokens_per_s, row.tokens_per_s_ci95, 1.0, 0),
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
                      _status_cell(row.optimizer, row.status, [row.reason or "", unstable], notes))
    c = report.corpus
    legend = Text(
        f"{_units_note(units)}. Corpus: {c.source}; {c.train_documents} documents ({c.train_tokens:,} tokens) "
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


def models_table(report: ModelsReport) -> Table:
    table = Table(title="Bundled model configs (no weights): use the name or any alias as MODEL")
    table.add_column("name", style="bold")
    table.add_column("description")
    table.add_column("aliases")
    for row in report.models:
        table.add_row(row.name, row.description, ", ".join(row.aliases) or "-")
    return table


def render(report: Report, units: str | None = None, models: list[tuple[str, ModelReport]] | None = None) -> Group:
    """Any report as the command that made it shows it. `models`: (label, report) of each run whose rows
    `report` combines, so that every run's model is described."""
    if isinstance(report, CheckReport):
        return check_table(report)
    if isinstance(report, OptimizersReport):
        return optimizers_table(report)
    if isinstance(report, ModelsReport):
        return Group(models_table(report))
    assert isinstance(report, ModelReport)
    chosen = report_units(report, units)
    if isinstance(report, StateSizeReport):
        body = state_size_table(report, chosen)
    elif isinstance(report, CompareReport):
        body = compare_table(report, chosen)
    elif isinstance(report, TuneReport):
        body = tune_table(report, chosen)
    else:
        assert isinstance(report, PredictReport)
        body = predict_table(report, chosen)
    return Group(*_model_lines(report, models), body)


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
    else:
        assert isinstance(report, PredictReport)
        largest = max((row.predicted_device_bytes or 0 for row in report.results), default=0)
    return auto_units(largest)


def _model_lines(report: ModelReport, models: list[tuple[str, ModelReport]] | None) -> list[Text]:
    """One line for the model; with several runs, one per run (labelled), or one when they share it."""
    if not models or len({r.model for _, r in models}) == 1:
        return [model_line(report)]
    return [Text.assemble((f"[{label}] ", "dim"), model_line(run)) for label, run in models]


PIPE_WIDTH = 120  # columns when writing to a pipe or file, where rich would otherwise assume 80


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else PIPE_WIDTH
    return Console(stderr=stderr, soft_wrap=False, width=width)
