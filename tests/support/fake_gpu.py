"""Fakes for the GPU paths: an NVML backend and a torch.cuda module, scripted by the test."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from optprof.measure.device import CudaDevice

GIB = 2**30


def _next(readings: list[Any]) -> Any:
    """Successive readings; the last one repeats."""
    return readings.pop(0) if len(readings) > 1 else readings[0]


@dataclass
class FakeCard:
    uuid: str  # NVML form, "GPU-..."
    bus_id: str  # NVML form, 8-digit domain
    name: str = "NVIDIA H100 80GB HBM3"
    used: list[int] = field(default_factory=lambda: [GIB])
    processes: list[dict[int, int | None]] = field(default_factory=lambda: [{}])
    energy_mj: list[int] | None = None  # None: the card has no energy counter
    total: int = 80 * GIB


class FakeNvml:
    def __init__(self, cards: list[FakeCard]) -> None:
        self.cards = cards
        self.shut_down = False

    def device_count(self) -> int:
        return len(self.cards)

    def handle(self, index: int) -> FakeCard:
        return self.cards[index]

    def uuid(self, handle: FakeCard) -> str:
        return handle.uuid

    def pci_bus_id(self, handle: FakeCard) -> str:
        return handle.bus_id

    def name(self, handle: FakeCard) -> str:
        return handle.name

    def memory_used(self, handle: FakeCard) -> int:
        return _next(handle.used)

    def memory_total(self, handle: FakeCard) -> int:
        return handle.total

    def process_memory(self, handle: FakeCard) -> dict[int, int | None]:
        return _next(handle.processes)

    def total_energy_mj(self, handle: FakeCard) -> int | None:
        return None if handle.energy_mj is None else _next(handle.energy_mj)

    def driver_version(self) -> str:
        return "570.86.15"

    def shutdown(self) -> None:
        self.shut_down = True


class FakeEvent:
    def __init__(self, enable_timing: bool = False) -> None:
        self.at = 0.0

    def record(self) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.at - self.at) * 1000.0  # milliseconds, as CUDA events


class FakeCuda:
    """Just what CudaDevice calls on torch.cuda."""

    Event = FakeEvent

    def __init__(self, stats: dict[str, int], uuid: str | None = "1a2b3c4d-0000-1111-2222-333344445555",
                 pci: tuple[int, int, int] | None = (0, 0x65, 0)) -> None:
        self.stats = stats
        self.props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * GIB)
        if uuid is not None:
            self.props.uuid = uuid
        if pci is not None:
            self.props.pci_domain_id, self.props.pci_bus_id, self.props.pci_device_id = pci
        self.synchronized = 0
        self.resets = 0
        self.memory_fraction: float | None = None

    def set_per_process_memory_fraction(self, fraction: float, index: int | None = None) -> None:
        self.memory_fraction = fraction

    def synchronize(self, index: int | None = None) -> None:
        self.synchronized += 1

    def reset_peak_memory_stats(self, index: int | None = None) -> None:
        self.resets += 1

    def memory_stats(self, index: int | None = None) -> dict[str, int]:
        return self.stats

    def get_device_properties(self, index: int) -> SimpleNamespace:
        return self.props

    def get_device_name(self, index: int) -> str:
        return self.props.name


class CudaOnCpu(CudaDevice):
    """A CudaDevice over a fake torch.cuda whose tensors live on the CPU: the trial's GPU branches, without CUDA."""

    def __init__(self, cuda: FakeCuda) -> None:
        super().__init__(0, cuda)
        self.torch_device = "cpu"
