"""`optprof state-size`: exact optimizer-state bytes, measured on the real optimizers over a meta model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from optprof.config import ModelSelection, StateSizeConfig, Strategy
from optprof.distributed.sharding import adam_mini_on_cpu_ranks, fake_process_group, fake_tensors, shard_fsdp
from optprof.errors import UsageError
from optprof.interrupts import Interrupted, stop_children
from optprof.model.info import ModelInfo, trainable_parameters
from optprof.model.layer_copies import affine_at, affine_dict, layer_copies
from optprof.model.loading import load_selection
from optprof.optimizers.outcome import status_of
from optprof.optimizers.registry import (
    REGISTRY,
    OptimizerEntry,
    availability,
    check_opt_args,
    resolve_optimizers,
)
from optprof.optimizers.state import (
    StateAccount,
    account_state,
    logical_state_bytes,
    step_on_meta,
)
from optprof.optimizers.trained import (
    STATE_SIZE_TOKENS,
    give_meta_gradients,
    names_found,
    untrained_count,
    untrained_in,
)
from optprof.processes.forked import run_each
from optprof.results.reports import StateSizeReport, command_config
from optprof.results.rows import FinishedRows, StatePart, StateSizeRow
from optprof.results.vocab import LayerExtent, StateMethod, Status

if TYPE_CHECKING:
    from torch import nn

REFERENCE = "adamw"


def measure_entry(
    entry: OptimizerEntry, module: nn.Module, info: ModelInfo, opt_args: dict, untrained: frozenset[str] = frozenset()
) -> tuple[StateAccount, StateMethod]:
    """Build `entry` over the meta `module`, step once (every parameter with a gradient but the `untrained`), and
    account its state."""
    give_meta_gradients(module, untrained)
    optimizer, method = step_on_meta(lambda: entry.build(module, info, opt_args))
    return account_state(optimizer, trainable_parameters(module), entry.second_moment_keys), method


@dataclass(frozen=True)
class Subject:
    """What the optimizers step over: the whole model on meta and, where its figures extrapolate, copies of
    its first 1, 2 and 3 layers (None: the whole model is stepped, for the reason in `why`); `untrained`: the
    parameters that get no gradient (`optimizers.trained`), by name, which no optimizer keeps state for."""

    module: nn.Module
    info: ModelInfo
    copies: tuple[tuple[nn.Module, ModelInfo], ...] | None = None
    why: str | None = None
    untrained: frozenset[str] = frozenset()

    @property
    def trained_params(self) -> int:
        """The parameters that take a gradient, and so state: the trainable ones but the `untrained`."""
        return self.info.trained_params - untrained_count(self.module, self.untrained)


def subject_for(selection: ModelSelection, module: nn.Module, info: ModelInfo, full_model: bool) -> Subject:
    """The copies a decoder's repeated layers allow: a step costs time per parameter tensor, and a 7B model has
    32 layers of the same tensors (see `model.layer_copies.layer_copies`)."""
    untrained = names_found(untrained_in(selection, STATE_SIZE_TOKENS, module))
    if full_model:
        return Subject(module, info, why="--full-model", untrained=untrained)
    copies, why = layer_copies(selection, info)
    if why is not None:
        return Subject(module, info, why=why, untrained=untrained)
    return Subject(module, info, tuple((copy.module, copy.info) for copy in copies), untrained=untrained)


def _extrapolated(accounts: list[StateAccount], layers: int) -> StateAccount | None:
    """The whole model's account from its copies', when every figure is affine in the layer count."""
    state = affine_at([a.state_bytes for a in accounts], layers)
    tensors = affine_at([a.tensors for a in accounts], layers)
    dtypes = affine_dict([a.bytes_by_dtype for a in accounts], layers)
    moments = [a.second_moment_entries for a in accounts]
    entries = None if None in moments else affine_at(moments, layers)  # type: ignore[arg-type]
    parts = _extrapolated_parts(accounts, layers)
    if state is None or tensors is None or dtypes is None or (entries is None) != (None in moments) or parts is None:
        return None
    return StateAccount(state, tensors, {k: v for k, v in dtypes.items() if v}, entries, parts)


def _extrapolated_parts(accounts: list[StateAccount], layers: int) -> tuple[StatePart, ...] | None:
    """Each part's parameters and state at the model's layer count; None where a part is not affine (or the
    copies name different parts)."""
    if len({tuple(part.name for part in a.parts) for a in accounts}) != 1:
        return None
    parts = []
    for same in zip(*(a.parts for a in accounts), strict=True):
        parameters = affine_at([part.parameters for part in same], layers)
        state = affine_at([part.state_bytes for part in same], layers)
        if parameters is None or state is None:
            return None
        parts.append(dataclasses.replace(same[-1], parameters=parameters, state_bytes=state))
    return tuple(parts)


def measure_subject(entry: OptimizerEntry, subject: Subject, opt_args: dict,
                    ) -> tuple[StateAccount, StateMethod, LayerExtent | None]:
    """`measure_entry` on the copies, extrapolated; on the whole model where there are none or a figure is not
    affine in the layer count (a buffer sized by the largest tensor, say), which the extent then says."""
    untrained = subject.untrained
    if subject.copies is None:
        return (*measure_entry(entry, subject.module, subject.info, opt_args, untrained), None)
    measured = [measure_entry(entry, module, info, opt_args, untrained) for module, info in subject.copies]
    account = _extrapolated([a for a, _ in measured], subject.info.num_layers)
    if account is None:
        return (*measure_entry(entry, subject.module, subject.info, opt_args, untrained), LayerExtent.NOT_AFFINE)
    return account, measured[-1][1], LayerExtent.EXTRAPOLATED


def _base_row(entry: OptimizerEntry, opt_args: dict, status: Status, reason: str | None = None) -> StateSizeRow:
    return StateSizeRow(**entry.row_head(opt_args), status=status, reason=reason)


def _row(entry: OptimizerEntry, subject: Subject, opt_args: dict, ranks: int = 1,
         strategy: Strategy = Strategy.FSDP) -> StateSizeRow:
    """The entry's measured row; unavailable, unsupported or failed (with the reason) instead of raising."""
    reason = availability(entry)
    if reason is not None:
        return _base_row(entry, opt_args, Status.UNAVAILABLE, reason)
    base = _base_row(entry, opt_args, Status.OK)
    try:
        account, method, extent = measure_subject(entry, subject, opt_args)
    except Exception as exc:
        status, reason = status_of(exc, entry, ranks, strategy)
        return dataclasses.replace(base, status=status, reason=reason)
    entries = account.second_moment_entries
    trained = subject.trained_params
    return dataclasses.replace(
        base,
        state_bytes=account.state_bytes,
        bytes_per_param=account.state_bytes / trained,
        state_dtypes=account.bytes_by_dtype,
        state_tensors=account.tensors,
        second_moment_entries=entries,
        second_moment_removed=None if entries is None else 1.0 - entries / trained,
        method=method,
        layer_extent=extent,
        state_parts=account.parts,
    )


def _with_reference(row: StateSizeRow, reference: int | None) -> StateSizeRow:
    if row.state_bytes is None or not reference:
        return row
    ratio = row.state_bytes / reference
    return dataclasses.replace(row, ratio_vs_adamw=ratio, saving_vs_adamw=1.0 - ratio)


def _measure_all(
    entries: list[OptimizerEntry], subject: Subject, opt_args: dict, jobs: int, on_row: Callable[[StateSizeRow], None],
) -> list[StateSizeRow]:
    """One row per entry, in order. With jobs > 1, forked workers share the built meta model (copy-on-write)."""
    died = "the measuring process died (crash or out of memory); retry with --jobs 1 to see the error"
    # Longest first: package optimizers (imports, Python-heavy steps) sit at the end of the registry, so
    # submitting in reverse lets the cheap torch ones fill the gaps at the end.
    return run_each(lambda i, here: _row(entries[i], subject, opt_args), len(entries), jobs,
                    died=lambda i: _base_row(entries[i], opt_args, Status.FAILED, died),
                    on_result=lambda i, row: on_row(row), order=range(len(entries) - 1, -1, -1))


def _sharded_rows(config: StateSizeConfig, entries: list[OptimizerEntry], on_row: Callable[[StateSizeRow], None],
                  ) -> tuple[ModelInfo, list[StateSizeRow], int, frozenset[str]]:
    """--gpus N: the model sharded by FSDP2 over a fake process group, on fake tensors; each optimizer steps
    once and rank 0's own state is counted (real sharding, not a division). Also AdamW's, as reference."""
    with (fake_process_group(config.gpus, config.strategy, config.shard_size) as mesh, adam_mini_on_cpu_ranks(),
          fake_tensors()):
        loaded = load_selection(config.model, device="cpu")
        module, info = loaded.module, loaded.info
        shard_fsdp(module, mesh, config.strategy)
        params = trainable_parameters(module)
        # on a meta build of its own: on this module the pass would be a sharded fake step
        untrained = names_found(untrained_in(config.model, STATE_SIZE_TOKENS))
        subject = Subject(module, info, untrained=untrained)
        trained_per_rank = subject.trained_params / config.gpus

        def logical(entry: OptimizerEntry) -> int:
            give_meta_gradients(module, untrained)
            optimizer, _ = step_on_meta(lambda: entry.build(module, info, config.opt_args))
            return logical_state_bytes(optimizer, params)

        rows = []
        for entry in entries:
            row = _row(entry, subject, config.opt_args, config.gpus, config.strategy)
            row = dataclasses.replace(row, world_size=config.gpus)
            if row.status == Status.OK:
                row = dataclasses.replace(row, method=StateMethod.FSDP_FAKE, state_logical_bytes=logical(entry),
                                          bytes_per_param=(row.state_bytes or 0) / trained_per_rank)
            rows.append(row)
            on_row(row)
        selected = next((r for r in rows if r.optimizer == REFERENCE and r.status == Status.OK), None)
        reference = (selected.state_bytes if selected is not None and selected.state_bytes is not None
                     else measure_entry(REGISTRY[REFERENCE], module, info, {}, untrained)[0].state_bytes)
    return info, rows, reference, untrained


def run_state_size(config: StateSizeConfig, on_row: Callable[[StateSizeRow], None] | None = None) -> StateSizeReport:
    entries = resolve_optimizers(list(config.optimizers))  # unknown names fail before the model loads
    check_opt_args(entries, config.opt_args)
    opt_args = config.opt_args
    selection = config.model
    reference: int | None = None
    finished: FinishedRows[StateSizeRow] = FinishedRows(on_row)
    interrupted: str | None = None
    loaded = load_selection(selection) if config.gpus == 1 else None
    info = loaded.info if loaded is not None else None
    untrained: frozenset[str] = frozenset()
    try:
        if loaded is None:
            info, rows, reference, untrained = _sharded_rows(config, entries, finished)
        else:
            module, info = loaded.module, loaded.info
            if info.params == 0:
                raise UsageError(f"model '{selection.model}' has no parameters")
            subject = subject_for(selection, module, info, config.full_model)
            untrained = subject.untrained
            rows = _measure_all(entries, subject, opt_args, config.jobs, finished)
            reference_row = next((r for r in rows if r.optimizer == REFERENCE and r.status == Status.OK), None)
            if reference_row is None:  # not selected (or failed with user args): measure it with defaults
                account, _, _ = measure_subject(REGISTRY[REFERENCE], subject, {})
                reference = account.state_bytes
            else:
                reference = reference_row.state_bytes
    except Interrupted as stop:  # keep the rows that finished; stop the workers before anything is written
        stop_children()
        interrupted = str(stop)
        rows = finished.or_interrupted((_base_row(e, opt_args, Status.OK) for e in entries), interrupted)
        info = info or load_selection(selection).info  # on meta, cheap
    assert info is not None
    return StateSizeReport(
        model=info,
        interrupted=interrupted,
        reference_state_bytes=reference,
        results=tuple(_with_reference(r, reference) for r in rows),
        untrained_parameters=tuple(sorted(untrained)),
        config={
            **command_config("state-size", selection, [e.name for e in entries], opt_args),
            "gpus": config.gpus,
            "strategy": config.strategy if config.gpus > 1 else None,
            "shard_size": config.shard_size,
            "full_model": config.full_model,
        },
    )

