"""Result records and their serialised forms (JSON with a schema name and version, CSV via pandas).

Bytes are int and fractions are floats in [0, 1]; nothing here formats units (report.py does).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import platform
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optprof import __version__

if TYPE_CHECKING:
    import pandas as pd

    from optprof.models import ModelInfo

STATE_SIZE_SCHEMA = "optprof.state-size"
STATE_SIZE_SCHEMA_VERSION = 1

STATUS_OK = "ok"
STATUS_FAILED = "failed"  # the optimizer ran here and broke: a real problem, exit code 1
STATUS_UNAVAILABLE = "unavailable"  # cannot run on this machine (package missing): not an error

# How a state figure was obtained (StateSizeRow.method).
METHOD_META_STEP = "meta step"
METHOD_META_PLACEHOLDERS = "meta step, placeholder scalars"  # value reads answered by a placeholder

ENVIRONMENT_PACKAGES = (
    "torch", "transformers", "adam-mini", "pytorch-optimizer", "bitsandbytes", "torchao",
    "nvidia-ml-py", "psutil", "pandas", "typer", "rich",
)


@dataclass(frozen=True)
class StateSizeRow:
    optimizer: str
    package: str
    package_version: str | None
    family: str
    status: str
    reason: str | None = None
    state_bytes: int | None = None
    bytes_per_param: float | None = None
    ratio_vs_adamw: float | None = None
    saving_vs_adamw: float | None = None  # 1 - ratio
    state_dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> bytes
    state_tensors: int | None = None  # distinct storages
    second_moment_entries: int | None = None  # adaptive "learning rates"; None if not adaptive
    second_moment_removed: float | None = None  # share of Adam's one-per-parameter removed
    method: str | None = None  # how the state was obtained, e.g. "meta step"
    settings: str | None = None  # memory-relevant settings in effect, e.g. GaLore's rank


@dataclass(frozen=True)
class StateSizeReport:
    model: ModelInfo
    reference_state_bytes: int | None  # AdamW's, measured in the same run
    results: tuple[StateSizeRow, ...]
    config: dict[str, Any]
    environment: dict[str, Any]
    created: str
    schema: str = STATE_SIZE_SCHEMA
    schema_version: int = STATE_SIZE_SCHEMA_VERSION

    @property
    def failed(self) -> bool:
        return any(row.status == STATUS_FAILED for row in self.results)


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def environment() -> dict[str, Any]:
    """Versions and machine facts that make a result reproducible; cheap (no CUDA initialisation)."""
    packages: dict[str, str | None] = {}
    for name in ENVIRONMENT_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "optprof": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "packages": packages,
    }


def to_dict(report: StateSizeReport) -> dict[str, Any]:
    body = dataclasses.asdict(report)
    ordered = {"schema": body.pop("schema"), "schema_version": body.pop("schema_version")}
    ordered.update(body)
    return ordered


def to_json(report: StateSizeReport) -> str:
    return json.dumps(to_dict(report), indent=2) + "\n"


def to_frame(report: StateSizeReport) -> pd.DataFrame:
    """One row per optimizer, model columns repeated, so several runs concatenate into one table."""
    import pandas as pd

    rows = []
    for row in report.results:
        record = {
            "model": report.model.name,
            "dtype": report.model.dtype,
            "params": report.model.params,
            "embedding_params": report.model.embedding_params,
            "embedding_fraction": report.model.embedding_fraction,
        }
        record.update(dataclasses.asdict(row))
        record["state_dtypes"] = ";".join(f"{k}={v}" for k, v in row.state_dtypes.items())
        rows.append(record)
    return pd.DataFrame(rows)


def to_csv(report: StateSizeReport) -> str:
    return to_frame(report).to_csv(index=False)
