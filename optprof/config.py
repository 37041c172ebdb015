"""What each command was asked to do: frozen dataclasses built by the CLI from its flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSelection:
    model: str  # bundled name, hub alias, local folder or hub id
    dtype: str = "float32"  # parameter (and so gradient and state) dtype
    revision: str | None = None  # hub revision; ignored for bundled and local configs
    trust_remote_code: bool = False


@dataclass(frozen=True)
class StateSizeConfig:
    model: ModelSelection
    optimizers: tuple[str, ...]  # registry names or package.module:Class paths, as the user gave them
    opt_args: dict[str, Any] = field(default_factory=dict)  # passed to every selected optimizer
    jobs: int = 1  # optimizers measured at once, in forked worker processes
