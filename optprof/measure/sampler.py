"""A background thread that samples memory while the timed steps run: process RSS, and NVML on a GPU.
(Energy is a counter, read at both ends by tracker.EnergyMeter, not sampled.)

Sampling only reads counters (/proc for RSS, NVML calls that release the GIL), so it barely touches the
steps it watches; the benchmark measures how much (tokens/s with and without it).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from optprof.errors import error_text
from optprof.measure.nvml import NvmlReader


def process_rss() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


@dataclass(frozen=True)
class SamplerResult:
    samples: int
    duration_s: float
    rss_peak_bytes: int
    nvml_device_peak_bytes: int | None = None  # whole card, every process on it
    nvml_process_peak_bytes: int | None = None  # this process on the card (CUDA context included)
    nvml_error: str | None = None  # NVML failed mid-run: its figures cover the samples before, RSS goes on


class MemorySampler:
    """Context manager: samples every `interval_s` from enter to exit, and once at each end."""

    def __init__(self, interval_s: float, nvml: NvmlReader | None = None,
                 rss: Callable[[], int] = process_rss) -> None:
        self.interval_s = interval_s
        self.nvml = nvml
        self._rss = rss
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples = 0
        self._rss_peak = 0
        self._device_peak: int | None = None
        self._process_peak: int | None = None
        self._nvml_error: str | None = None
        self._started = 0.0
        self.result: SamplerResult | None = None

    def _sample(self) -> None:
        self._samples += 1
        self._rss_peak = max(self._rss_peak, self._rss())
        if self.nvml is None:
            return
        try:
            device_used, process_used = self.nvml.device_used(), self.nvml.process_used()
        except Exception as exc:  # a driver hiccup must not end the thread (and with it the RSS samples)
            self._nvml_error, self.nvml = error_text(exc), None
            return
        self._device_peak = max(self._device_peak or 0, device_used)
        if process_used is not None:
            self._process_peak = max(self._process_peak or 0, process_used)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._started = time.perf_counter()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="optprof-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.result = SamplerResult(
            samples=self._samples,
            duration_s=time.perf_counter() - self._started,
            rss_peak_bytes=self._rss_peak,
            nvml_device_peak_bytes=self._device_peak,
            nvml_process_peak_bytes=self._process_peak,
            nvml_error=self._nvml_error,
        )
