"""torch 2.13's caching-allocator configuration, parsed as torch 2.13 parses it: the same environment variables,
tokens, keys, checks and messages.

Read from torch 2.13.0 (git cf30153): the headers c10/core/AllocatorConfig.h (`ConfigTokenizer`) and
c10/cuda/CUDAAllocatorConfig.h (the CUDA keys, `getKeys`) as installed, and the parsers c10/core/AllocatorConfig.cpp
(`AcceleratorAllocatorConfig::parseArgs` and its `parse*` functions) and c10/cuda/CUDAAllocatorConfig.cpp
(`CUDAAllocatorConfig::parseArgs`), checked against the 2.13 binaries and, for the shared keys, against the
installed build itself (tests/unit/test_alloc_conf.py runs torch's own parser on every case).

What torch does that is kept on purpose:
- whitespace is deleted, not a separator (`max_split_size_mb : 1 00` is 100 MB);
- the ':' after a key and the ',' after a value are stepped over without being checked
  (`ConfigTokenizer::checkToken` returns a bool no caller reads);
- integers are `std::stoull` (a leading number is enough: `25abc` is 25; `-1` wraps, then is clamped), fractions
  `std::stod`;
- a CUDA build refuses unknown keys; the shared parser runs first, so its message is the one shown.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from optprof.errors import UsageError

KMB = 1 << 20
SIZE_MAX = 2**64 - 1
MIN_LARGE_ALLOC_MB = 10  # kMinLargeAlloc / kMB: large_segment_size_mb must exceed it
DEFAULT_LARGE_SEGMENT = 20 * KMB  # kLargeBuffer: 1-10 MiB requests share segments of this size
INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: one divisions entry per power of two from 1 MiB to 32 GiB and up
MAX_REGISTER_THREADS = 128  # pinned_num_register_threads at most (CUDAAllocatorConfig::parsePinnedNumRegisterThreads)
# The variables torch reads, first set wins (even when empty): AcceleratorAllocatorConfig::instance and
# CUDAAllocatorConfig::instance (PYTORCH_HIP_ALLOC_CONF between them on ROCm builds only)
ENVIRONMENT = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")

ACCELERATOR_KEYS = ("large_segment_size_mb", "max_split_size_mb", "max_non_split_rounding_mb",
                    "garbage_collection_threshold", "roundup_power2_divisions", "expandable_segments",
                    "pinned_use_background_threads", "pinned_max_round_threshold_mb", "pinned_max_cached_size_mb")
CUDA_BOOL_KEYS = ("release_lock_on_cudamalloc", "release_lock_on_hipmalloc", "pinned_use_cuda_host_register",
                  "pinned_use_hip_host_register", "graph_capture_record_stream_reuse", "pinned_free_catch_all",
                  "throw_on_cudamalloc_oom")
CUDA_KEYS = ("backend", *CUDA_BOOL_KEYS, "pinned_num_register_threads", "pinned_reserve_segment_size_mb",
             "per_process_memory_fraction")
NATIVE, ASYNC = "native", "cudaMallocAsync"

_STOULL = re.compile(r"[+-]?\d+")
_STOD = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)", re.IGNORECASE)


class AllocConfError(ValueError):
    """What torch raises for this configuration, in torch's words."""


@dataclass(frozen=True)
class AllocatorConfig:
    """The options that change what the caching allocator reserves (the pinned-memory and locking options change
    nothing on the card and are only checked)."""

    max_split_size: int = SIZE_MAX  # bytes; blocks this large are never split
    max_non_split_rounding: int = DEFAULT_LARGE_SEGMENT  # an oversize block serves a request within this of it
    large_segment_size: int = DEFAULT_LARGE_SEGMENT  # segments (and expandable pages) for 1-10 MiB requests
    roundup_power2_divisions: tuple[int, ...] = (0,) * INTERVALS  # per power-of-two interval from 1 MiB; 0/1: off
    garbage_collection_threshold: float = 0.0  # 0: off; acts only with a memory fraction under 1
    expandable_segments: bool = False
    per_process_memory_fraction: float = 1.0  # of the card's total memory that segments may take
    backend: str = NATIVE

    def divisions(self, size: int) -> int:
        """`roundup_power2_divisions(size)`: the divisions of the interval `size` (bytes) falls in."""
        index = max(0, min(INTERVALS - 1, size.bit_length() - 1 - 20))
        return self.roundup_power2_divisions[index]

    @classmethod
    def parse(cls, text: str | None) -> AllocatorConfig:
        """The configuration `text` (the environment variable's syntax) gives; AllocConfError as torch refuses."""
        return _Parser(text or "").parse()

    @classmethod
    def from_environment(cls, given: str | None = None) -> AllocatorConfig:
        """`given` (--alloc-conf), else the first of torch's variables that is set."""
        return cls.parse(given if given is not None else environment_text())

    @classmethod
    def checked(cls, given: str | None = None) -> AllocatorConfig:
        """`from_environment`, a configuration torch refuses being the user's one line naming where it came from."""
        try:
            return cls.from_environment(given)
        except AllocConfError as exc:
            source = "--alloc-conf" if given is not None else environment_name()
            raise UsageError(f"{source}: torch 2.13 refuses it: {exc}") from None

    def text(self) -> str:
        """A configuration string that parses back to this configuration (expandable_segments always named)."""
        parts = [f"expandable_segments:{self.expandable_segments}"]
        if self.backend != NATIVE:
            parts.append(f"backend:{self.backend}")
        if self.large_segment_size != DEFAULT_LARGE_SEGMENT:
            parts.append(f"large_segment_size_mb:{self.large_segment_size // KMB}")
        if self.max_split_size != SIZE_MAX:
            parts.append(f"max_split_size_mb:{self.max_split_size // KMB}")
        if self.max_non_split_rounding != self.large_segment_size:
            parts.append(f"max_non_split_rounding_mb:{self.max_non_split_rounding // KMB}")
        table = self.roundup_power2_divisions
        if len(set(table)) == 1 and table[0]:
            parts.append(f"roundup_power2_divisions:{table[0]}")
        elif any(table):
            parts.append("roundup_power2_divisions:[" + ",".join(f"{1 << i}:{d}" for i, d in enumerate(table)) + "]")
        if self.garbage_collection_threshold:
            parts.append(f"garbage_collection_threshold:{self.garbage_collection_threshold!r}")
        if self.per_process_memory_fraction != 1.0:
            parts.append(f"per_process_memory_fraction:{self.per_process_memory_fraction!r}")
        return ",".join(parts)


def environment_name() -> str:
    """The variable torch reads: the first of ENVIRONMENT that is set (the first one when none is)."""
    return next((name for name in ENVIRONMENT if name in os.environ), ENVIRONMENT[0])


def environment_text() -> str:
    """What torch reads from the environment: the first variable of ENVIRONMENT that is set."""
    return os.environ.get(environment_name(), "")


def tokens(text: str) -> list[str]:
    """`ConfigTokenizer`: ',' ':' '[' ']' are tokens of their own, whitespace is dropped, the rest are words."""
    found: list[str] = []
    word = ""
    for ch in text:
        if ch in ",:[]":
            if word:
                found.append(word)
                word = ""
            found.append(ch)
        elif ch not in " \t\n\v\f\r":
            word += ch
    if word:
        found.append(word)
    return found


def _stoull(text: str) -> int:
    match = _STOULL.match(text)
    if match is None:
        raise AllocConfError("stoull")
    value = int(match.group())
    if abs(value) > SIZE_MAX:
        raise AllocConfError("stoull")
    return value % (SIZE_MAX + 1)  # a minus sign wraps, as strtoull does


def _stod(text: str) -> float:
    match = _STOD.match(text)
    if match is None:
        raise AllocConfError("stod")
    return float(match.group())


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _megabytes(value: int) -> int:
    return min(value, SIZE_MAX // KMB) * KMB


class _Parser:
    """Both of torch's passes over one token list: the shared (accelerator) keys, then the CUDA keys."""

    def __init__(self, text: str) -> None:
        self.tokens = tokens(text)
        self.values: dict[str, object] = {}

    def at(self, index: int) -> str:
        if index >= len(self.tokens):
            raise AllocConfError("Index out of bounds in ConfigTokenizer")
        return self.tokens[index]

    def value_index(self, index: int) -> int:
        """The value's index after the key at `index` (the ':' between them is stepped over, unchecked)."""
        self.at(index + 1)
        self.at(index + 2)
        return index + 2

    def skip_key(self, index: int) -> int:
        """`skipKey`: past one value, or a whole [...] list."""
        index = self.value_index(index)
        if self.tokens[index] == "[":
            while self.tokens[index] != "]":
                index += 1
                if index >= len(self.tokens):
                    raise AllocConfError("Expected closing bracket ']' in ConfigTokenizer but reached end of config")
        return index

    def keys(self, handle: dict[str, object]) -> None:
        """The main loop: a key, its value (returning the value's last index), then one token stepped over."""
        index = 0
        while index < len(self.tokens):
            key = self.tokens[index]
            handler = handle.get(key, handle.get(""))
            index = handler(index)  # type: ignore[operator]
            if index + 1 < len(self.tokens):
                index += 1  # the ',' (checkToken: never enforced)
            index += 1

    def parse(self) -> AllocatorConfig:
        large = DEFAULT_LARGE_SEGMENT
        # pass 1 of AcceleratorAllocatorConfig::parseArgs: every token looked at for large_segment_size_mb alone
        # (the sizes check against it), nothing else parsed or skipped
        index = 0
        while index < len(self.tokens):
            if self.tokens[index] == "large_segment_size_mb":
                index = self.large_segment(index)
            index += 1
        large = int(self.values.get("large_segment_size", large))  # type: ignore[call-overload]
        self.values.setdefault("max_non_split_rounding", large)
        self.large_mb = large // KMB
        accelerator: dict[str, object] = {key: self.skip_key for key in CUDA_KEYS}
        accelerator |= {
            "large_segment_size_mb": self.skip_key,
            "max_split_size_mb": lambda i: self.size_at_least(i, "max_split_size_mb", "max_split_size"),
            "max_non_split_rounding_mb": lambda i: self.size_at_least(i, "max_non_split_rounding_mb",
                                                                      "max_non_split_rounding"),
            "garbage_collection_threshold": self.gc_threshold,
            "roundup_power2_divisions": self.divisions,
            "expandable_segments": lambda i: self.boolean(i, "expandable_segments"),
            "pinned_use_background_threads": lambda i: self.boolean(i, None),
            "pinned_max_round_threshold_mb": self.any_size,
            "pinned_max_cached_size_mb": self.any_size,
            "": self.unknown("Accelerator"),
        }
        self.keys(accelerator)
        cuda: dict[str, object] = {key: self.skip_key for key in ACCELERATOR_KEYS}
        cuda |= {key: (lambda i: self.boolean(i, None)) for key in CUDA_BOOL_KEYS}
        cuda |= {"backend": self.backend, "pinned_num_register_threads": self.register_threads,
                 "pinned_reserve_segment_size_mb": self.reserve_segment,
                 "per_process_memory_fraction": self.fraction, "": self.unknown("CUDA")}
        self.keys(cuda)
        return AllocatorConfig(**self.values)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------------------ values
    def unknown(self, parser: str) -> object:
        def refuse(index: int) -> int:
            raise AllocConfError(f"Unrecognized key '{self.tokens[index]}' in {parser} allocator config.")
        return refuse

    def large_segment(self, index: int) -> int:
        index = self.value_index(index)
        value = _stoull(self.tokens[index])
        if value <= MIN_LARGE_ALLOC_MB:
            raise AllocConfError(f"CachingAllocator option large_segment_size_mb must be > {MIN_LARGE_ALLOC_MB} MB")
        self.values["large_segment_size"] = _megabytes(value)
        return index

    def size_at_least(self, index: int, key: str, field: str) -> int:
        index = self.value_index(index)
        value = _stoull(self.tokens[index])
        if value < self.large_mb:
            raise AllocConfError(f"CachingAllocator option {key} too small, must be >= {self.large_mb}")
        self.values[field] = _megabytes(value)
        return index

    def any_size(self, index: int) -> int:
        index = self.value_index(index)
        _stoull(self.tokens[index])
        return index

    def gc_threshold(self, index: int) -> int:
        index = self.value_index(index)
        value = _stod(self.tokens[index])
        if not 0.0 < value < 1.0:
            raise AllocConfError("garbage_collect_threshold is invalid, set it in (0.0, 1.0)")
        self.values["garbage_collection_threshold"] = value
        return index

    def divisions(self, index: int) -> int:
        """A number for every interval, or `[256:1,512:2,>:4]`: interval (MB, a power of two) to divisions; the
        first interval's value also covers every smaller size, '>' every larger one than the last named."""
        index = self.value_index(index)
        table = [0] * INTERVALS
        if self.tokens[index] != "[":
            value = _stoull(self.tokens[index])
            if not _power_of_two(value):
                raise AllocConfError("For roundups, the divisions has to be power of 2 ")
            self.values["roundup_power2_divisions"] = (value,) * INTERVALS
            return index
        last, first = 0, True
        index += 1
        while index < len(self.tokens) and self.tokens[index] != "]":
            interval = self.tokens[index]
            value = _stoull(self.at(index + 2))
            index += 2
            if value != 0 and not _power_of_two(value):
                raise AllocConfError("For roundups, the divisions has to be power of 2 or 0 to disable roundup ")
            if interval == ">":
                table[last + 1:] = [value] * (INTERVALS - last - 1)
            else:
                megabytes = _stoull(interval)
                if not _power_of_two(megabytes):
                    raise AllocConfError("For roundups, the intervals have to be power of 2 ")
                position = min(INTERVALS - 1, megabytes.bit_length() - 1)
                if first:
                    table[:position] = [value] * position
                    first = False
                table[position] = value
                last = position
            if self.at(index + 1) != "]":
                index += 1  # the ',' (unchecked)
            index += 1
        if index >= len(self.tokens):
            raise AllocConfError("Expected closing bracket ']' in ConfigTokenizer but reached end of config")
        self.values["roundup_power2_divisions"] = tuple(table)
        return index

    def boolean(self, index: int, field: str | None) -> int:
        index = self.value_index(index)
        word = self.tokens[index]
        if word not in ("True", "False"):
            raise AllocConfError(f"Expected 'True' or 'False' at index {index} in ConfigTokenizer but got '{word}'")
        if field is not None:
            self.values[field] = word == "True"
        return index

    def backend(self, index: int) -> int:
        index = self.value_index(index)
        if self.tokens[index] not in (NATIVE, ASYNC):
            raise AllocConfError("Unknown allocator backend, options are native and cudaMallocAsync")
        self.values["backend"] = self.tokens[index]
        return index

    def register_threads(self, index: int) -> int:
        index = self.value_index(index)
        value = _stoull(self.tokens[index])
        if not _power_of_two(value):
            raise AllocConfError(f"Number of register threads has to be power of 2, got {value}")
        if value > MAX_REGISTER_THREADS:
            raise AllocConfError(f"Number of register threads should be less than or equal to "
                                 f"{MAX_REGISTER_THREADS}, got {value}")
        return index

    def reserve_segment(self, index: int) -> int:
        index = self.value_index(index)
        if _stoull(self.tokens[index]) == 0:
            raise AllocConfError("Pinned reserve segment size has to be greater than 0")
        return index

    def fraction(self, index: int) -> int:
        index = self.value_index(index)
        value = _stod(self.tokens[index])
        if not 0.0 <= value <= 1.0:
            raise AllocConfError("per_process_memory_fraction is invalid, set it in [0.0, 1.0]")
        self.values["per_process_memory_fraction"] = value
        return index
