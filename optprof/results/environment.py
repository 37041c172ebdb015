"""The machine and package versions a report was made with (cheap: no CUDA initialisation)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from typing import Any

from optprof import __version__

ENVIRONMENT_PACKAGES = (
    "torch", "transformers", "adam-mini", "pytorch-optimizer", "bitsandbytes", "torchao",
    "nvidia-ml-py", "psutil", "pandas", "typer", "rich",
)


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "packages": packages,
    }
