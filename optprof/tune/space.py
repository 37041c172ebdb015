"""Search spaces of `optprof tune`: the hyperparameters each optimizer is tuned over, their ranges and scales,
and the quasi-random points a tuning run tries (a Halton sequence with a seeded random shift).

Ranges follow the optimizer study (seeds/000): learning rate on a log scale; momentum, RMSProp's smoothing
constant alpha and Adam's beta1 and beta2 as 1 - x on a log scale (the values that matter crowd near 1);
epsilon and weight decay on a log scale. They are wide enough to hold the study's tuned values (learning
rates 2e-5 .. 1e-2 for fine-tuning, momentum up to 0.99, alpha 0.9 .. 0.99, betas 0.9 .. 0.999, epsilon 1e-5)
and the larger learning rates that training from scratch wants. `--space FILE.toml` overrides them.
"""

from __future__ import annotations

import math
import random
import tomllib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from optprof.errors import UsageError, read_user_text

Scale = Literal["log", "log1m", "linear"]  # log: log-uniform; log1m: 1 - x log-uniform; linear: uniform

# The scale a hyperparameter gets when a --space file gives only its range.
DEFAULT_SCALES: dict[str, Scale] = {"lr": "log", "eps": "log", "weight_decay": "log", "momentum": "log1m",
                                    "alpha": "log1m", "beta1": "log1m", "beta2": "log1m"}


@dataclass(frozen=True)
class Hyperparameter:
    """One tuned hyperparameter: its range [low, high] in its own units, and how the range is sampled."""

    name: str  # the optimizer's keyword (beta1 and beta2 become `betas`)
    low: float
    high: float
    scale: Scale = "log"

    def __post_init__(self) -> None:
        problem = _range_problem(self)
        if problem:
            raise UsageError(f"search space: {self.name} {problem}")

    def value(self, u: float) -> float:
        """The value at `u` in [0, 1): low at 0, towards high as u grows, uniform on the scale."""
        if self.low == self.high:
            return self.low
        if self.scale == "log":
            return math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        if self.scale == "log1m":  # 1 - x from 1 - low down to 1 - high, log-uniform
            top, bottom = math.log(1 - self.low), math.log(1 - self.high)
            return 1 - math.exp(top + u * (bottom - top))
        return self.low + u * (self.high - self.low)

    def describe(self) -> str:
        scale = {"log": "log", "log1m": "log of 1 - x", "linear": "linear"}[self.scale]
        return f"{self.low:g}" if self.low == self.high else f"[{self.low:g}, {self.high:g}] ({scale})"


def _range_problem(h: Hyperparameter) -> str | None:
    if h.scale not in get_args(Scale):
        return f"has scale '{h.scale}': choose one of {', '.join(get_args(Scale))}"
    if not (math.isfinite(h.low) and math.isfinite(h.high)) or h.low > h.high:
        return f"needs finite low <= high, got [{h.low}, {h.high}]"
    if h.low == h.high:
        return None  # fixed: nothing is sampled
    if h.scale == "log" and h.low <= 0:
        return f"is on a log scale: low must be above 0, got {h.low}"
    if h.scale == "log1m" and not (h.low >= 0 and h.high < 1):
        return f"is sampled as 1 - x on a log scale: needs 0 <= low and high < 1, got [{h.low}, {h.high}]"
    return None


SearchSpace = tuple[Hyperparameter, ...]

SGD_LR = Hyperparameter("lr", 1e-3, 3.0)  # plain SGD on a small transformer wants large steps
ADAPTIVE_LR = Hyperparameter("lr", 1e-4, 3e-2)
MOMENTUM = Hyperparameter("momentum", 0.0, 0.99, "log1m")  # 0 (plain SGD) .. 0.99, median 0.9
ALPHA = Hyperparameter("alpha", 0.9, 0.999, "log1m")
BETA1 = Hyperparameter("beta1", 0.5, 0.99, "log1m")
BETA2 = Hyperparameter("beta2", 0.9, 0.9999, "log1m")
EPS = Hyperparameter("eps", 1e-10, 1e-3)  # large epsilon turns an adaptive method towards momentum SGD
WEIGHT_DECAY = Hyperparameter("weight_decay", 1e-4, 1e-1)
FALLBACK: SearchSpace = (Hyperparameter("lr", 1e-5, 1e-1),)  # an optimizer with no space here: its rate only

DEFAULT_SPACES: dict[str, SearchSpace] = {
    "sgd": (SGD_LR,),
    "momentum": (SGD_LR, MOMENTUM),
    "nesterov": (SGD_LR, MOMENTUM),
    "rmsprop": (ADAPTIVE_LR, MOMENTUM, ALPHA, EPS),
    "adam": (ADAPTIVE_LR, BETA1, BETA2, EPS),
    "nadam": (ADAPTIVE_LR, BETA1, BETA2, EPS),
    "adamw": (ADAPTIVE_LR, BETA1, BETA2, EPS, WEIGHT_DECAY),
    "adam-mini": (ADAPTIVE_LR, BETA1, BETA2, EPS, WEIGHT_DECAY),
    "adam-mini-paper": (ADAPTIVE_LR, BETA1, BETA2, EPS, WEIGHT_DECAY),
}


def default_space(optimizer: str) -> SearchSpace:
    return DEFAULT_SPACES.get(optimizer, FALLBACK)


def halton(index: int, base: int) -> float:
    """The radical inverse of `index` in `base`: the index'th point of the base's van der Corput sequence."""
    value, fraction = 0.0, 1.0 / base
    while index > 0:
        index, digit = divmod(index, base)
        value += digit * fraction
        fraction /= base
    return value


PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # one Halton base per dimension


def sample(space: SearchSpace, count: int, seed: int, optimizer: str) -> list[dict[str, float]]:
    """`count` quasi-random points of `space`: Halton points 1..count, shifted (mod 1) by a random vector
    seeded from `seed` and the optimizer's name, so that optimizers do not share their points."""
    if len(space) > len(PRIMES):
        raise UsageError(f"search space of {optimizer}: at most {len(PRIMES)} hyperparameters")
    shift_source = random.Random(seed * 1_000_003 + zlib.crc32(optimizer.encode()))
    shifts = [shift_source.random() for _ in space]
    return [{h.name: h.value((halton(i, base) + shift) % 1.0) for h, base, shift in zip(space, PRIMES, shifts,
                                                                                           strict=False)}
            for i in range(1, count + 1)]


def optimizer_kwargs(hyperparameters: dict[str, float]) -> dict[str, Any]:
    """The keyword arguments the optimizer takes: beta1 and beta2 become `betas`, the rest pass as they are."""
    kwargs: dict[str, Any] = {k: v for k, v in hyperparameters.items() if k not in ("beta1", "beta2")}
    if "beta1" in hyperparameters or "beta2" in hyperparameters:
        kwargs["betas"] = (hyperparameters.get("beta1", 0.9), hyperparameters.get("beta2", 0.999))
    return kwargs


def read_space_file(path: Path, known: set[str]) -> dict[str, dict[str, Hyperparameter]]:
    """A --space TOML file: a table per optimizer, a key per hyperparameter, whose value is a fixed number,
    [low, high] (the name's default scale) or {low, high, scale}. It overrides those keys of the defaults."""
    try:
        data = tomllib.loads(read_user_text(path, "--space "))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--space '{path}' is not TOML: {exc}") from exc
    spaces: dict[str, dict[str, Hyperparameter]] = {}
    for optimizer, table in data.items():
        if optimizer not in known and ":" not in optimizer:
            raise UsageError(f"--space '{path}': unknown optimizer '{optimizer}' (`optprof optimizers` lists them)")
        if not isinstance(table, dict):
            raise UsageError(f"--space '{path}': [{optimizer}] must be a table of hyperparameters")
        spaces[optimizer] = {name: _parse_entry(path, optimizer, name, value) for name, value in table.items()}
    return spaces


def _parse_entry(path: Path, optimizer: str, name: str, value: Any) -> Hyperparameter:
    where = f"--space '{path}': {optimizer}.{name}"
    scale = DEFAULT_SCALES.get(name, "linear")
    if _is_number(value):
        return Hyperparameter(name, float(value), float(value), scale)
    if isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value):
        return Hyperparameter(name, float(value[0]), float(value[1]), scale)
    if isinstance(value, dict) and {"low", "high"} <= value.keys() <= {"low", "high", "scale"}:
        if not (_is_number(value["low"]) and _is_number(value["high"])):
            raise UsageError(f"{where}: low and high must be numbers, got {value['low']!r} and {value['high']!r}")
        scale = value.get("scale", scale)
        if scale not in get_args(Scale):
            raise UsageError(f"{where}: scale must be one of {', '.join(get_args(Scale))}, got {scale!r}")
        return Hyperparameter(name, float(value["low"]), float(value["high"]), scale)
    raise UsageError(f"{where}: expected a number, [low, high] or {{low, high, scale}}, got {value!r}")


def _is_number(value: Any) -> bool:
    """A finite int or float from TOML (TOML's true and false are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def resolve_space(optimizer: str, overrides: dict[str, dict[str, Hyperparameter]]) -> SearchSpace:
    """The optimizer's default space with the --space file's keys replacing (or joining) its own."""
    merged = {h.name: h for h in default_space(optimizer)}
    merged.update(overrides.get(optimizer, {}))
    return tuple(merged.values())
