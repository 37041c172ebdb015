"""Reports: every report is a `Report` (schema name and version, environment, `failed`), written as JSON and
read back into equal objects, or flattened to a one-row-per-result DataFrame / CSV.

Bytes are int, times seconds and fractions floats in [0, 1]; nothing here formats units (render/ does).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from optprof.errors import UsageError
from optprof.model.info import ModelInfo
from optprof.results.codec import decode, flat
from optprof.results.environment import environment, now_iso
from optprof.results.rows import (
    BudgetRanking,
    CompareRow,
    CorpusInfo,
    InclusionCheck,
    ModelListing,
    OptimizerListing,
    PlanRow,
    PredictRow,
    StateSizeRow,
    TuneRow,
    Verdict,
)
from optprof.results.vocab import Judgement, LayerExtent, Status

if TYPE_CHECKING:
    import pandas as pd


def command_config(command: str, selection: Any, optimizers: list[str], opt_args: dict[str, Any]) -> dict[str, Any]:
    """The head of every report's `config`: the command, the model selection, the optimizers and their args."""
    return {
        "command": command,
        **json.loads(json.dumps(dataclasses.asdict(selection))),  # as JSON gives it back (tuples as lists)
        "optimizers": optimizers,
        "opt_args": {k: repr(v) for k, v in opt_args.items()},
    }


@dataclass(frozen=True, kw_only=True)
class Report:
    """What every report has. Subclasses name their schema and the field that holds their rows."""

    SCHEMA: ClassVar[str]
    SCHEMA_VERSION: ClassVar[int] = 1
    ROWS: ClassVar[str] = "results"  # the field holding one record per optimizer (or verdict, or listing)
    NAME: ClassVar[str] = "optimizer"  # the field of a row that names it (labelled by `optprof report`)

    environment: dict[str, Any] = field(default_factory=environment)
    created: str = field(default_factory=now_iso)
    # The signal that stopped the run (SIGINT, SIGTERM): the finished rows are as measured, the rest `interrupted`
    interrupted: str | None = None

    def rows(self) -> tuple[Any, ...]:
        return getattr(self, self.ROWS)

    @property
    def failed(self) -> bool:
        """Whether the command should exit 1: a row broke (unavailable, oom and does-not-fit are findings)."""
        return any(getattr(row, "status", None) == Status.FAILED for row in self.rows())

    def to_dict(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        head = {"schema": self.SCHEMA, "schema_version": self.SCHEMA_VERSION}
        own = {k: v for k, v in body.items() if k not in ("environment", "created")}
        return {**head, **own, "environment": body["environment"], "created": body["created"],
                "failed": self.failed}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """The report `data` holds; a UsageError when it is another kind or a newer schema version."""
        schema, version = data.get("schema"), data.get("schema_version")
        if schema != cls.SCHEMA:
            raise UsageError(f"expected an {cls.SCHEMA} report, got {schema!r}")
        if not isinstance(version, int):
            raise UsageError(f"{schema} report without a readable schema version ({version!r}): not written by "
                             "optprof, or edited")
        if version > cls.SCHEMA_VERSION:
            raise UsageError(f"{schema} schema version {version} is newer than this optprof reads "
                             f"({cls.SCHEMA_VERSION}): upgrade optprof")
        return decode(cls, cls.upgraded(data, version))

    @classmethod
    def upgraded(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """`data` of an older schema version in the current one (a report kind that changed overrides this)."""
        return data

    @classmethod
    def _rows_upgraded(cls, data: dict[str, Any], upgrade: Callable[[dict[str, Any]], dict[str, Any]]
                       ) -> dict[str, Any]:
        """`data` with `upgrade` applied to each row that is a mapping (a damaged row is left for decoding)."""
        return {**data, cls.ROWS: [upgrade(row) if isinstance(row, dict) else row for row in data.get(cls.ROWS) or ()]}

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))

    def frame_head(self) -> dict[str, Any]:
        """Columns repeated on every row of the DataFrame, so that several runs concatenate."""
        return {}

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        head = self.frame_head()
        return pd.DataFrame([flat({**head, **dataclasses.asdict(row)}) for row in self.rows()])

    def to_csv(self) -> str:
        return self.to_frame().to_csv(index=False)

    def labelled(self, label: str) -> Report:
        """The same report with every row's name followed by `label` (rows of several runs, side by side)."""
        rows = tuple(dataclasses.replace(r, **{self.NAME: f"{getattr(r, self.NAME)} ({label})"}) for r in self.rows())
        replaced: dict[str, Any] = {self.ROWS: rows}
        return dataclasses.replace(self, **replaced)


@dataclass(frozen=True, kw_only=True)
class ModelReport(Report):
    """A report about one model: its description, the command's settings, then one row per optimizer."""

    model: ModelInfo
    config: dict[str, Any]

    def frame_head(self) -> dict[str, Any]:
        m = self.model
        return {"model": m.name, "dtype": m.dtype, "params": m.params, "embedding_params": m.embedding_params,
                "embedding_fraction": m.embedding_fraction, "setup": m.setup,
                "trainable_params": m.params if m.trainable_params is None else m.trainable_params}


@dataclass(frozen=True, kw_only=True)
class StateSizeReport(ModelReport):
    SCHEMA: ClassVar[str] = "optprof.state-size"
    SCHEMA_VERSION: ClassVar[int] = 2  # 2: a row's `method` is its StateMethod alone, `layer_extent` beside it

    @classmethod
    def upgraded(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Version 1 appended the layer extent to the method ("meta step, extrapolated from ..."): split."""
        if version >= 2:
            return data

        def split(row: dict[str, Any]) -> dict[str, Any]:
            method = row.get("method")
            text = method if isinstance(method, str) else ""
            extent = next((e for e in LayerExtent if text.endswith(f", {e}")), None)
            if extent is None:
                return row
            return {**row, "method": text.removesuffix(f", {extent}"), "layer_extent": extent.value}

        return cls._rows_upgraded(data, split)

    reference_state_bytes: int | None  # AdamW's, measured in the same run
    results: tuple[StateSizeRow, ...]
    # parameters that require grad but get no gradient from a forward and backward: no state (optimizers/trained.py)
    untrained_parameters: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class CompareReport(ModelReport):
    SCHEMA: ClassVar[str] = "optprof.compare"

    results: tuple[CompareRow, ...]
    device: dict[str, Any]  # the device the trials ran on, as a trial process saw it
    # Forward + backward is the same work for every optimizer at one micro-batch, so the relative range of its
    # time across the trials (max / min - 1) is the machine's drift between trials, not an optimizer's
    # property: tokens/s differences within it are not findings. None with fewer than two such trials.
    fwd_bwd_spread: float | None = None


@dataclass(frozen=True, kw_only=True)
class PredictReport(ModelReport):
    SCHEMA: ClassVar[str] = "optprof.predict"
    # 2: predicted_fragmentation_bytes split into predicted_reserved_minus_allocated_bytes and
    # predicted_cached_free_at_reserved_peak_bytes (what the old name held)
    SCHEMA_VERSION: ClassVar[int] = 2

    @classmethod
    def upgraded(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        if version >= 2:
            return data

        def renamed(row: dict[str, Any]) -> dict[str, Any]:
            if "predicted_fragmentation_bytes" not in row:
                return row
            row = dict(row)
            row["predicted_cached_free_at_reserved_peak_bytes"] = row.pop("predicted_fragmentation_bytes")
            reserved, allocated = row.get("predicted_reserved_bytes"), row.get("predicted_allocated_bytes")
            if isinstance(reserved, int) and isinstance(allocated, int):
                row["predicted_reserved_minus_allocated_bytes"] = reserved - allocated
            return row

        return cls._rows_upgraded(data, renamed)

    results: tuple[PredictRow, ...]
    assumptions: tuple[str, ...]  # what fake CPU tensors cannot see, and what was assumed instead


@dataclass(frozen=True, kw_only=True)
class PlanReport(ModelReport):
    SCHEMA: ClassVar[str] = "optprof.plan"

    results: tuple[PlanRow, ...]
    # setups, considered (setups x optimizers), pruned (by a bound), traced (setups stepped), searched_s, confirm_s
    search: dict[str, Any]
    assumptions: tuple[str, ...]

    def chosen(self) -> dict[str, PlanRow]:
        return {row.optimizer: row for row in self.results if row.choice == "chosen"}


@dataclass(frozen=True, kw_only=True)
class TuneReport(ModelReport):
    SCHEMA: ClassVar[str] = "optprof.tune"

    results: tuple[TuneRow, ...]
    inclusion: tuple[InclusionCheck, ...]
    ranking_by_budget: tuple[BudgetRanking, ...]
    corpus: CorpusInfo
    notes: tuple[str, ...] = ()  # how the figures were obtained: the protocol's choices


@dataclass(frozen=True, kw_only=True)
class CheckReport(Report):
    SCHEMA: ClassVar[str] = "optprof.check"
    ROWS: ClassVar[str] = "verdicts"

    verdicts: tuple[Verdict, ...]
    profiles: tuple[str, ...]
    strict: bool
    updated: dict[str, int]  # profile -> values rewritten (--update)

    def fails(self, verdict: Verdict) -> bool:
        """A regression or a missing figure fails; an improvement past the tolerance only under --strict."""
        return verdict.verdict in (Judgement.REGRESSION, Judgement.MISSING) or (
            self.strict and verdict.verdict == Judgement.IMPROVED)

    @property
    def failed(self) -> bool:
        return any(self.fails(v) for v in self.verdicts)


@dataclass(frozen=True, kw_only=True)
class OptimizersReport(Report):
    SCHEMA: ClassVar[str] = "optprof.optimizers"
    ROWS: ClassVar[str] = "optimizers"
    NAME: ClassVar[str] = "name"

    optimizers: tuple[OptimizerListing, ...]
    inclusion_chains: tuple[tuple[str, ...], ...]  # from the optimizer study: A ⊆ B ⊆ C
    strategy: str | None = None  # the strategy the support column is about; None: no such column
    support_ranks: int | None = None  # fake ranks the support was decided on
    support_shard_size: int | None = None  # hsdp: ranks per shard group there
    support_model: str | None = None  # the model it was decided on


@dataclass(frozen=True, kw_only=True)
class ModelsReport(Report):
    SCHEMA: ClassVar[str] = "optprof.models"
    ROWS: ClassVar[str] = "models"
    NAME: ClassVar[str] = "name"

    models: tuple[ModelListing, ...]

    @classmethod
    def bundled(cls) -> ModelsReport:
        """The configs bundled in profiles/models."""
        from optprof.model.loading import bundled_models

        return cls(models=tuple(ModelListing(b.name, b.description, b.aliases) for b in bundled_models().values()))


REPORT_TYPES: dict[str, type[Report]] = {
    cls.SCHEMA: cls for cls in (StateSizeReport, CompareReport, PredictReport, PlanReport, TuneReport,
                                CheckReport, OptimizersReport, ModelsReport)
}
