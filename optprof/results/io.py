"""Saved reports: read back from JSON files (one line for the user when they are not reports), several runs
combined side by side, and written as JSON or CSV."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from optprof.errors import UsageError, read_user_text
from optprof.results.reports import REPORT_TYPES, CheckReport, Report


def load_report(data: Any, source: str = "the input") -> Report:
    """Any saved report, by its schema name; a UsageError naming `source` when it is not one."""
    schema = data.get("schema") if isinstance(data, dict) else None
    cls = REPORT_TYPES.get(schema) if isinstance(schema, str) else None
    if cls is None:
        known = ", ".join(REPORT_TYPES)
        raise UsageError(f"{source} is not an optprof report (schema {schema!r}; known: {known})")
    try:
        return cls.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"{source}: a damaged {schema} report ({type(exc).__name__}: {exc})") from exc


def combined(reports: list[Report], labels: list[str]) -> Report:
    """Reports of one kind as one: every row labelled by the run it came from, the first run's settings."""
    kinds = {type(r).SCHEMA for r in reports}
    if len(kinds) > 1:
        raise UsageError(f"cannot show reports of different kinds side by side: {', '.join(sorted(kinds))}")
    parts = [r.labelled(label) for r, label in zip(reports, labels, strict=True)]
    first = parts[0]
    merged: dict[str, Any] = {first.ROWS: tuple(row for part in parts for row in part.rows())}
    if isinstance(first, CheckReport):
        merged["profiles"] = tuple(p for part in parts for p in part.profiles)  # type: ignore[attr-defined]
    return dataclasses.replace(first, **merged)


def read_report(path: Path) -> Report:
    """A report saved as JSON; a UsageError naming the file when it cannot be read or is not a report."""
    try:
        data = json.loads(read_user_text(path))
    except json.JSONDecodeError as exc:
        raise UsageError(f"'{path}' is not JSON: {exc}") from exc
    return load_report(data, f"'{path}'")


def run_labels(paths: list[Path]) -> list[str]:
    """What labels each run's rows: the file name without suffix, or the whole path where names repeat."""
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def serialise(reports: list[Report], labels: list[str], fmt: str) -> str:
    """JSON (one report, or an array of them) or CSV (with a `run` column when there are several)."""
    if fmt == "json":
        if len(reports) == 1:
            return reports[0].to_json()
        return json.dumps([r.to_dict() for r in reports], indent=2) + "\n"
    if len(reports) == 1:
        return reports[0].to_csv()
    import pandas as pd

    frames = [r.to_frame().assign(run=label) for r, label in zip(reports, labels, strict=True)]
    frame = pd.concat(frames, ignore_index=True)
    return frame[["run", *[c for c in frame.columns if c != "run"]]].to_csv(index=False)
