"""state-size, predict, check, optimizers and models reports as rich tables."""

from __future__ import annotations

import os

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from optprof.render.console import (
    failure_line,
    parts_text,
    share,
    short_dtype,
    status_cell,
    strategy,
    titled_table,
    units_note,
)
from optprof.results.profiles import MEASURES
from optprof.results.reports import (
    CheckReport,
    ModelsReport,
    OptimizersReport,
    PredictReport,
    StateSizeReport,
)
from optprof.results.rows import OptimizerListing, PredictRow
from optprof.results.vocab import BREAKDOWN_KEYS, Judgement, LayerExtent, StateMethod, Status, Support
from optprof.units import (
    UNITS,
    format_bytes,
    format_count,
    format_fraction,
    format_measure,
    format_ms,
    format_rate,
)


def state_size_table(report: StateSizeReport, units: str = "gb") -> Group:
    _, unit = UNITS[units]
    ranks = report.config.get("gpus") or 1
    where = "one real step on the meta device" if ranks == 1 else (
        f"per rank of {ranks} ({strategy(report.config)}), FSDP2 sharding on fake tensors (the logical "
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
        method = "" if row.method in (None, StateMethod.META_STEP, StateMethod.FSDP_FAKE) else str(row.method)
        extent = str(row.layer_extent) if row.layer_extent == LayerExtent.NOT_AFFINE else ""  # else said once, below
        remarks = [row.reason or "", row.settings or "", parts_text(row.state_parts, units), method, extent]
        status = status_cell(row.optimizer, row.status, remarks, notes)
        table.add_row(
            row.optimizer,
            format_bytes(row.state_bytes, units),
            "-" if row.bytes_per_param is None else f"{row.bytes_per_param:.3f}",
            vs,
            format_count(row.second_moment_entries),
            format_fraction(row.second_moment_removed),
            "+".join(short_dtype(dtype) for dtype in row.state_dtypes) or "-",
            status,
        )
    legend = Text(
        f"{units_note(units)}. vs AdamW: change against AdamW measured in the same run. 2nd moment: "
        "adaptive learning rates (second-moment entries) kept; Adam v removed: share of Adam's one per "
        "trainable parameter gone; bytes/param: per trainable parameter.",
        style="dim",
    )
    extrapolated = [row.optimizer for row in report.results if row.layer_extent == LayerExtent.EXTRAPOLATED]
    if extrapolated:
        notes.insert(0, Text(
            f"{'Every row' if len(extrapolated) == len(report.results) else ', '.join(extrapolated)}: stepped on "
            f"copies of the model's first 1, 2 and 3 layers and extrapolated to its {report.model.num_layers}: "
            "the copies' parameters add up to the model's, and every figure was checked affine in the layer count "
            "(exact; --full-model steps the whole model).", style="dim"))
    if report.untrained_parameters:
        from optprof.optimizers.trained import STATE_SIZE_TOKENS, untrained_note

        note = untrained_note(frozenset(report.untrained_parameters), STATE_SIZE_TOKENS)
        notes.append(Text(f"{note}.", style="dim"))
    return Group(table, legend, *notes)


def predict_table(report: PredictReport, units: str) -> Group:
    """What a decision needs first (state, device memory against the card, largest micro-batch, tokens/s per GPU,
    MFU, status), then the memory breakdown and, with --gpu, the step's time split, each in a table of its own so
    that none is cut at 80 columns."""
    _, unit = UNITS[units]
    first = next((r for r in report.results if r.status == Status.OK), None)
    config = report.config
    ranks = f", per rank of {config['gpus']} ({strategy(config)})" if config.get("gpus", 1) > 1 else ""
    shape = "" if first is None else f" at micro-batch {first.micro_batch} x {first.seq_len} tokens"
    memory = config.get("gpu_memory_bytes")
    timed = any(row.predicted_step_s is not None for row in report.results)
    at_max = any(row.predicted_step_s_at_max is not None for row in report.results)
    simulated = any(row.predicted_reserved_bytes is not None for row in report.results)
    gpu = f" on {config['gpu']}" if config.get("gpu") else ""
    table = titled_table(f"PREDICTED for {config['target_device']}{gpu}{shape}{ranks}")
    table.add_column("optimizer", style="bold", no_wrap=True)
    table.add_column(f"state\n{unit}", justify="right", no_wrap=True)
    table.add_column(f"{'device' if simulated else '+ reserve'}\n{unit}", justify="right", no_wrap=True)
    if memory is not None:
        table.add_column("max\nµbatch", justify="right", no_wrap=True)
    if timed:
        table.add_column("tokens/s\nper GPU", justify="right", no_wrap=True)
        table.add_column("MFU", justify="right", no_wrap=True)
    if at_max:
        table.add_column("tokens/s/GPU\nat max", justify="right", no_wrap=True)
        table.add_column("MFU\nat max", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    notes: list[Text] = []
    for row in report.results:
        status = status_cell(row.optimizer, row.status, [row.reason or "", row.settings or ""], notes)
        largest = "-" if row.predicted_max_micro_batch is None else (
            f"{row.predicted_max_micro_batch}{'+' if row.predicted_max_capped else ''}")
        table.add_row(
            row.optimizer, format_bytes(row.state_bytes, units), format_bytes(row.predicted_device_bytes, units),
            *((largest,) if memory is not None else ()),
            *((format_rate(row.predicted_tokens_per_s_per_gpu), share(row.predicted_mfu)) if timed else ()),
            *((format_rate(row.predicted_tokens_per_s_per_gpu_at_max), share(row.predicted_mfu_at_max))
              if at_max else ()),
            status,
        )
    breakdown = titled_table(f"Memory per device at micro-batch {first.micro_batch if first else '-'} ({unit})")
    breakdown.add_column("optimizer", style="bold", no_wrap=True)
    for key in ("params", "grads", "activ.", "temps", "tensor\npeak"):
        breakdown.add_column(key, justify="right", no_wrap=True)
    if simulated:
        breakdown.add_column("allocated", justify="right", no_wrap=True)
        breakdown.add_column("reserved", justify="right", no_wrap=True)
    breakdown.add_column("device", justify="right", no_wrap=True)
    for row in report.results:
        if row.status != Status.OK:
            continue
        parts = [row.predicted_breakdown.get(k) for k in BREAKDOWN_KEYS if k != "optimizer_state"]
        breakdown.add_row(
            row.optimizer, *(format_bytes(p, units) for p in parts), format_bytes(row.predicted_peak_bytes, units),
            *((format_bytes(row.predicted_allocated_bytes, units), format_bytes(row.predicted_reserved_bytes, units))
              if simulated else ()),
            format_bytes(row.predicted_device_bytes, units))
    tables: list[Table] = [table, breakdown]
    if timed:
        timing = titled_table(
            "Step time, ms (predicted): forward + backward + optimizer + exposed communication = step")
        timing.add_column("optimizer", style="bold", no_wrap=True)
        for key in ("µbatch", "fwd", "bwd", "optim.", "exposed\ncomm.", "step", "all\ncomm."):
            timing.add_column(key, justify="right", no_wrap=True)
        for row in report.results:
            if row.status != Status.OK or row.predicted_step_s is None:
                continue
            sizes = [(row.micro_batch, row.predicted_phase_s, row.predicted_step_s, row.predicted_communication_s)]
            if row.predicted_step_s_at_max is not None and row.predicted_max_micro_batch != row.micro_batch:
                sizes.append((row.predicted_max_micro_batch, row.predicted_phase_s_at_max,
                              row.predicted_step_s_at_max, None))
            for index, (size, phases, step, communication) in enumerate(sizes):
                timing.add_row(row.optimizer if index == 0 else "", str(size),
                               *(format_ms(phases.get(k)) for k in ("forward", "backward", "optimizer",
                                                              "exposed_communication")),
                               format_ms(step), format_ms(communication))
        tables.append(timing)
    reserve = format_bytes(config.get("reserve_bytes"), units)
    if simulated:
        outside = "; ".join(f"{c['name']} {format_bytes(c['bytes'], units)}" for c in config.get("outside_allocator")
                            or ()) or f"--reserve {reserve}"
        explained = (f"allocated / reserved: torch.cuda.max_memory_allocated / max_memory_reserved, from the step's "
                     f"allocations replayed through the caching-allocator model ({config.get('alloc_conf')}). "
                     f"device: reserved plus what sits outside the allocator ({outside} {unit}).")
        fit = " max µbatch: the largest whose replay does not run out of memory on"
    else:
        explained = f"+ reserve: the peak plus {reserve} {unit} that tensors do not show."
        fit = " max µbatch: the largest whose peak + reserve fits"
    legend = Text(
        f"{units_note(units)}. Everything predicted from fake tensors, nothing allocated. Breakdown at the tensor "
        f"peak (state: the real optimizer's, exact). {explained}"
        + ("" if memory is None else f"{fit} {format_bytes(memory, units)} {unit}.")
        + (" tokens/s per GPU and MFU: from the predicted step time (the notes say how)." if timed else ""),
        style="dim",
    )
    assumptions = [Text("Assumed: " + a, style="dim") for a in report.assumptions]
    return Group(*tables, legend, *notes, *assumptions)


def prediction_line(row: PredictRow, units: str = "gb") -> Text:
    if row.status != Status.OK:
        return failure_line(row.optimizer, row.status, row.reason)
    largest = "" if row.predicted_max_micro_batch is None else (
        f", predicted max micro-batch {row.predicted_max_micro_batch}")
    took = "" if row.predict_s is None else f" ({row.predict_s:.1f} s)"
    return Text.assemble((f"{row.optimizer}: ", "bold"),
                         f"predicted peak {format_bytes(row.predicted_peak_bytes, units)} {UNITS[units][1]}"
                         f"{largest}{took}")


VERDICT_STYLE = {Judgement.OK: "green", Judgement.REGRESSION: "bold red", Judgement.MISSING: "bold red",
                 Judgement.IMPROVED: "cyan", Judgement.SKIPPED: "yellow"}


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


SUPPORT_STYLE = {Support.OK: "green", Support.UNSUPPORTED: "yellow", Support.UNAVAILABLE: "dim", Support.FAILED: "red"}


def _support_cell(row: OptimizerListing) -> Text:
    """yes, or the status; the reasons follow the table, where they have its full width."""
    if row.support == Support.UNAVAILABLE:
        return Text("-", style="dim")  # the column before says why
    return Text("yes" if row.support == Support.OK else str(row.support), style=_support_style(row.support))


def _support_style(support: Support | None) -> str:
    return "" if support is None else SUPPORT_STYLE.get(support, "")


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
        lines += [Text(f"  {row.name}: {row.support_reason}", style=_support_style(row.support))
                  for row in report.optimizers if row.support not in (Support.OK, Support.UNAVAILABLE)]
    lines.append(Text("Inclusion relations (optimizer study): A ⊆ B means B reduces to A for some hyperparameters"))
    lines += [Text("  " + " ⊆ ".join(chain)) for chain in report.inclusion_chains]
    lines.append(Text("Any other optimizer: -o package.module:ClassName [--opt-arg key=value ...]", style="dim"))
    return Group(table, *lines)


def models_table(report: ModelsReport) -> Table:
    table = Table(title="Bundled model configs (no weights): use the name or any alias as MODEL")
    table.add_column("name", style="bold")
    table.add_column("description")
    table.add_column("aliases")
    for row in report.models:
        table.add_row(row.name, row.description, ", ".join(row.aliases) or "-")
    return table
