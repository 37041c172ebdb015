"""Profiles (TOML files of expected footprints) and the verdicts of actual figures against them.

A profile names what to run and what to expect:

    [profile]
    model = "demo"                       # bundled name, local folder or hub id
    optimizers = ["adamw", "sgd"]
    seq_len = 128                        # for the peaks
    [tolerance]                          # relative; defaults below
    predicted_peak_bytes = 0.01
    [expected.adamw]
    state_bytes = 57165980

Each key under `[expected.<optimizer>]` is a measure to guard. Bytes and peaks fail when they grow past the
tolerance; tokens/s fails when it falls below it. Improvements past the tolerance are reported (so the
baseline gets refreshed) and fail only under --strict.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from optprof.config import Amp, DeviceKind, Dtype, parse_checkpointing, parse_loss, parse_mp_policy
from optprof.errors import UsageError, read_user_text
from optprof.files import write_whole
from optprof.results.rows import Verdict
from optprof.results.vocab import Judgement, Status
from optprof.trainers import RECIPES

if TYPE_CHECKING:
    from optprof.results.reports import ModelReport

Command = Literal["state-size", "predict", "compare"]


@dataclass(frozen=True)
class Measure:
    """One figure a profile can guard. Adding a measure is one entry here plus its computation in a command."""

    name: str  # the key under [expected.<optimizer>] and [tolerance]
    row_field: str  # the field of a result row that holds it
    tolerance: float  # default relative tolerance
    higher_is_better: bool  # tokens/s: a drop is the regression; bytes: a rise is
    needs_gpu: bool  # measured on a GPU only; skipped (and said so) elsewhere
    commands: tuple[Command, ...]  # whose rows carry it: check runs the first, unless another one already runs

    @property
    def is_bytes(self) -> bool:
        return self.row_field.endswith("_bytes")

    def stored(self, value: float) -> int | float:
        """As a profile keeps it: whole bytes, or tokens/s to one decimal."""
        return int(value) if self.is_bytes else round(float(value), 1)


MEASURES: dict[str, Measure] = {m.name: m for m in (
    # exact: the same optimizer over the same model keeps the same bytes
    Measure("state_bytes", "state_bytes", 0.0, False, False, ("state-size", "predict", "compare")),
    # fake tensors: deterministic, a little slack for library changes
    Measure("predicted_peak_bytes", "predicted_peak_bytes", 0.01, False, False, ("predict",)),
    # measured on a GPU: allocator behaviour varies a little
    Measure("peak_bytes", "peak_bytes", 0.05, False, True, ("compare",)),
    # a lower bound: throughput is noisy
    Measure("tokens_per_s", "tokens_per_s", 0.10, True, True, ("compare",)),
)}
PROFILE_KEYS = {"model": str, "optimizers": list, "dtype": str, "amp": str, "seq_len": int, "micro_batch": int,
                "device": str, "recipe": str, "mp_policy": str, "activation_checkpointing": str, "loss": str,
                "gradient_checkpointing": bool, "description": str}  # gradient_checkpointing: activation_checkpointing
# full, as profiles before 0.3 wrote it

@dataclass(frozen=True)
class Profile:
    path: Path
    model: str
    optimizers: tuple[str, ...]
    dtype: Dtype | None = None  # None: the recipe's, else float32
    amp: Amp | None = None
    seq_len: int | None = None
    micro_batch: int = 1
    device: DeviceKind = DeviceKind.CPU  # the target of predicted peaks; measured ones come from the GPU this runs on
    recipe: str | None = None  # a named trainer's step (trainers.RECIPES); the keys below override its settings
    mp_policy: str | None = None  # --mp-policy, as written (e.g. bf16,fp32)
    activation_checkpointing: str | None = None  # --activation-checkpointing, as written
    loss: str | None = None  # --loss, as written
    description: str | None = None
    tolerance: dict[str, float] = field(default_factory=dict)
    expected: dict[str, dict[str, float]] = field(default_factory=dict)  # optimizer -> measure -> value

    def measures(self) -> set[str]:
        return {m for values in self.expected.values() for m in values}

    def tolerance_for(self, measure: str) -> float:
        return self.tolerance.get(measure, MEASURES[measure].tolerance)


def _line_of(text: str, pattern: str) -> int | None:
    match = re.search(pattern, text, re.MULTILINE)
    return None if match is None else text.count("\n", 0, match.start()) + 1


def _bad(path: Path, line: int | None, message: str) -> UsageError:
    where = f"{path}:{line}" if line else str(path)
    return UsageError(f"profile {where}: {message}")


def load_profile(path: Path) -> Profile | None:
    """The profile in `path`; None for a TOML file that is not a profile (no [profile] table)."""
    text = read_user_text(path, "profile ")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _line_from_message(str(exc))
        raise _bad(path, line, f"not valid TOML: {str(exc).split(' (at line')[0]}") from exc
    if "profile" not in data:
        return None
    head = data["profile"]
    if not isinstance(head, dict):
        raise _bad(path, _line_of(text, r"^\s*profile\s*="), "[profile] must be a table")
    for key, value in head.items():
        wanted = PROFILE_KEYS.get(key)
        if wanted is None:
            raise _bad(path, _line_of(text, rf"^\s*{re.escape(key)}\s*="),
                       f"unknown key '{key}' in [profile] (known: {', '.join(PROFILE_KEYS)})")
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise _bad(path, _line_of(text, rf"^\s*{re.escape(key)}\s*="),
                       f"'{key}' must be a {wanted.__name__}")
    if "model" not in head or "optimizers" not in head:
        raise _bad(path, _line_of(text, r"^\s*\[profile\]"), "[profile] needs 'model' and 'optimizers'")
    tolerance = _numbers(path, text, data.get("tolerance", {}), "tolerance")
    expected_table = data.get("expected", {})
    if not isinstance(expected_table, dict):
        raise _bad(path, _line_of(text, r"^\s*expected\s*="), "[expected] must hold one table per optimizer")
    expected = {name: _numbers(path, text, values, f"expected.{name}") for name, values in expected_table.items()}
    for name in expected:
        if name not in head["optimizers"]:
            raise _bad(path, _line_of(text, rf"^\s*\[expected\.\"?{re.escape(name)}"),
                       f"[expected.{name}] names an optimizer that 'optimizers' does not list")
    dtype = _choice(path, text, head, "dtype", Dtype)
    device = _choice(path, text, head, "device", DeviceKind) or DeviceKind.CPU
    checkpointing = head.get("activation_checkpointing") or ("full" if head.get("gradient_checkpointing") else None)
    for key, parse in (("mp_policy", parse_mp_policy), ("activation_checkpointing", parse_checkpointing),
                       ("loss", parse_loss)):
        value = checkpointing if key == "activation_checkpointing" else head.get(key)
        try:
            if value is not None:
                parse(value)
        except UsageError as exc:
            raise _bad(path, _line_of(text, rf"^\s*{key}\s*="), str(exc)) from None
    if head.get("recipe") is not None and head["recipe"] not in RECIPES:
        raise _bad(path, _line_of(text, r"^\s*recipe\s*="),
                   f"unknown recipe '{head['recipe']}' (known: {', '.join(RECIPES)})")
    return Profile(path, head["model"], tuple(head["optimizers"]), dtype, _choice(path, text, head, "amp", Amp),
                   head.get("seq_len"), head.get("micro_batch", 1), device, head.get("recipe"),
                   head.get("mp_policy"), checkpointing, head.get("loss"), head.get("description"), tolerance,
                   expected)


E = TypeVar("E", bound=StrEnum)


def _choice(path: Path, text: str, head: dict[str, Any], key: str, kind: type[E]) -> E | None:
    """[profile]'s `key` as one of `kind`'s values, or None where it is not given."""
    if key not in head:
        return None
    try:
        return kind(head[key])
    except ValueError:
        raise _bad(path, _line_of(text, rf"^\s*{key}\s*="),
                   f"'{key}' must be one of {', '.join(kind)}, got {head[key]!r}") from None


def _line_from_message(message: str) -> int | None:
    match = re.search(r"at line (\d+)", message)
    return int(match.group(1)) if match else None


def _numbers(path: Path, text: str, table: Any, name: str) -> dict[str, float]:
    if not isinstance(table, dict):
        raise _bad(path, _line_of(text, rf"^\s*\[{re.escape(name)}\]"), f"[{name}] must be a table")
    for key, value in table.items():
        line = _line_of(text, rf"^\s*{re.escape(key)}\s*=")
        if key not in MEASURES:
            raise _bad(path, line, f"unknown measure '{key}' in [{name}] (known: {', '.join(MEASURES)})")
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise _bad(path, line, f"'{key}' in [{name}] must be a number >= 0")
    return dict(table)


def find_profiles(paths: Iterable[Path]) -> list[Profile]:
    """Profiles in the files and folders given (folders searched recursively for *.toml)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.rglob("*.toml"))
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"no such profile file or folder: {path}")
    profiles = [p for p in (load_profile(f) for f in files) if p is not None]
    if not profiles:
        raise UsageError(f"no profiles (TOML files with a [profile] table) in {', '.join(map(str, paths))}")
    return profiles


def judge(profile: Profile, optimizer: str, measure: str, expected: float, actual: float | None,
          skipped: str | None = None) -> Verdict:
    tolerance = profile.tolerance_for(measure)
    name = str(profile.path)
    if skipped is not None:
        return Verdict(name, optimizer, measure, expected, None, None, tolerance, Judgement.SKIPPED, skipped)
    if actual is None:
        return Verdict(name, optimizer, measure, expected, None, None, tolerance, Judgement.MISSING)
    change = actual / expected - 1 if expected else (0.0 if actual == 0 else float("inf"))
    higher_is_better = MEASURES[measure].higher_is_better
    worse = -change if higher_is_better else change
    if worse > tolerance:
        verdict = Judgement.REGRESSION
    elif -worse > tolerance:
        verdict = Judgement.IMPROVED
    else:
        verdict = Judgement.OK
    return Verdict(name, optimizer, measure, expected, actual, change, tolerance, verdict)


def update_profile(path: Path, actual: Mapping[str, Mapping[str, float]]) -> int:
    """Rewrite the expected values in `path` with `actual` (optimizer -> measure -> value), keeping comments,
    tolerances and every value not measured here. Returns how many values changed."""
    import tomlkit

    document = tomlkit.parse(path.read_text())
    expected = document.get("expected", {})
    changed = 0
    for optimizer, values in expected.items():
        for measure in list(values):
            new = actual.get(optimizer, {}).get(measure)
            if new is not None and values[measure] != new:
                values[measure] = MEASURES[measure].stored(new)
                changed += 1
    write_whole(path, tomlkit.dumps(document).encode())
    return changed


def profile_text(model: str, optimizers: Iterable[str], settings: Mapping[str, Any],
                 expected: Mapping[str, Mapping[str, float]], command: str) -> str:
    """A new profile guarding the measures a command just produced (--save-profile)."""
    import tomlkit

    document = tomlkit.document()
    document.add(tomlkit.comment(f"optprof profile, written by `optprof {command} --save-profile`."))
    document.add(tomlkit.comment("Check it with `optprof check`; refresh it with `optprof check --update`."))
    head = tomlkit.table()
    head["model"] = model
    head["optimizers"] = list(optimizers)
    for key, value in settings.items():
        if value is not None and key in PROFILE_KEYS:
            head[key] = value
    document["profile"] = head
    tolerance = tomlkit.table()
    measures = {m for values in expected.values() for m in values}
    for measure in MEASURES.values():
        if measure.name in measures:
            tolerance[measure.name] = measure.tolerance
    document["tolerance"] = tolerance
    table = tomlkit.table(is_super_table=True)
    for optimizer, values in expected.items():
        row = tomlkit.table()
        for name, value in values.items():
            row[name] = MEASURES[name].stored(value)
        table[optimizer] = row
    document["expected"] = table
    return tomlkit.dumps(document)


# The settings of a report's config that a profile records (those the command has).
PROFILE_SETTINGS = ("dtype", "amp", "seq_len", "micro_batch", "device", "recipe", "mp_policy",
                    "activation_checkpointing", "loss")
UNSAID_DEFAULTS = {"activation_checkpointing": "none", "loss": "default"}  # left out of a profile


def saved_measures(command: Command, device: str | None) -> list[Measure]:
    """What `--save-profile` guards for a command's results: the measures its rows carry, GPU ones on CUDA."""
    return [m for m in MEASURES.values() if command in m.commands and (not m.needs_gpu or device == DeviceKind.CUDA)]


def write_profile(path: Path, report: ModelReport, command: Command) -> None:
    """A profile guarding what `report` measured, for its optimizers that succeeded (--save-profile)."""
    measures = saved_measures(command, report.config.get("device"))
    settings = {key: report.config.get(key) for key in PROFILE_SETTINGS
                if report.config.get(key) != UNSAID_DEFAULTS.get(key)}
    ok = [row for row in report.rows() if row.status == Status.OK]
    expected = {row.optimizer: {m.name: getattr(row, m.row_field) for m in measures
                                if getattr(row, m.row_field) is not None} for row in ok}
    text = profile_text(report.model.name, [row.optimizer for row in ok], settings, expected, command)
    try:
        write_whole(path, text.encode())
    except OSError as exc:
        raise UsageError(f"cannot write '{path}': {exc.strerror or exc}") from exc
