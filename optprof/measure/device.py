"""The device a trial runs on: its clock, its allocator's counters and its identity.

`CudaDevice` takes the `torch.cuda` module as an argument so that tests can hand it a fake and run the
GPU branches on a machine without CUDA.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from optprof.config import DeviceKind
from optprof.measure.nvml import NvmlBackend, NvmlReader, TorchDeviceIdentity, find_nvml_device
from optprof.results.environment import cpu_name

NvmlFactory = Callable[[], tuple[NvmlBackend | None, str | None]]


@dataclass(frozen=True)
class AllocatorStats:
    """torch's CUDA caching-allocator counters since the last reset."""

    max_allocated_bytes: int  # peak bytes in live tensors
    max_reserved_bytes: int  # peak bytes the allocator held from the driver (what counts against the card)
    alloc_retries: int  # cudaMalloc failures that forced a cache flush and retry: a sign of memory pressure
    ooms: int


class Device(Protocol):
    type: DeviceKind  # autocast's device type, and which figures exist
    torch_device: str  # where tensors go, e.g. "cuda:0"

    def synchronize(self) -> None: ...
    def mark(self) -> Any: ...  # a point in time on the device's own timeline
    def seconds(self, start: Any, end: Any) -> float: ...  # call after synchronize()
    def reset_peaks(self) -> None: ...
    def allocator_stats(self) -> AllocatorStats | None: ...
    def identity(self) -> TorchDeviceIdentity | None: ...
    def name(self) -> str: ...
    def total_memory(self) -> int | None: ...
    def limit_memory(self, limit_bytes: int) -> None: ...


class CpuDevice:
    """CPU kernels run synchronously, so the host clock times them directly."""

    type = DeviceKind.CPU
    torch_device = "cpu"

    def synchronize(self) -> None:
        pass

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start

    def reset_peaks(self) -> None:
        pass

    def allocator_stats(self) -> AllocatorStats | None:
        return None

    def identity(self) -> TorchDeviceIdentity | None:
        return None

    def name(self) -> str:
        return cpu_name()

    def total_memory(self) -> int | None:
        import psutil

        return int(psutil.virtual_memory().total)

    def limit_memory(self, limit_bytes: int) -> None:
        pass  # nothing to cap: on a CPU, fitting is judged from the measured tensor peak


class CudaDevice:
    """CUDA work is asynchronous: phases are timed with CUDA events, read after a synchronize."""

    type = DeviceKind.CUDA

    def __init__(self, index: int = 0, cuda: Any = None) -> None:
        if cuda is None:
            import torch

            cuda = torch.cuda
        self.cuda = cuda
        self.index = index
        self.torch_device = f"cuda:{index}"

    def synchronize(self) -> None:
        self.cuda.synchronize(self.index)

    def mark(self) -> Any:
        event = self.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end)) / 1000.0  # elapsed_time is in milliseconds

    def reset_peaks(self) -> None:
        self.cuda.reset_peak_memory_stats(self.index)

    def allocator_stats(self) -> AllocatorStats:
        stats = self.cuda.memory_stats(self.index)
        return AllocatorStats(
            max_allocated_bytes=int(stats.get("allocated_bytes.all.peak", 0)),
            max_reserved_bytes=int(stats.get("reserved_bytes.all.peak", 0)),
            alloc_retries=int(stats.get("num_alloc_retries", 0)),
            ooms=int(stats.get("num_ooms", 0)),
        )

    def identity(self) -> TorchDeviceIdentity:
        props = self.cuda.get_device_properties(self.index)
        uuid = getattr(props, "uuid", None)
        bus = None
        if all(hasattr(props, f) for f in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
            bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return TorchDeviceIdentity(self.index, str(props.name), str(uuid) if uuid else None, bus)

    def name(self) -> str:
        return str(self.cuda.get_device_name(self.index))

    def total_memory(self) -> int:
        return int(self.cuda.get_device_properties(self.index).total_memory)

    def limit_memory(self, limit_bytes: int) -> None:
        """Make the caching allocator fail past `limit_bytes`, as a card that size would."""
        fraction = min(1.0, limit_bytes / self.total_memory())
        self.cuda.set_per_process_memory_fraction(fraction, self.index)


def open_device(kind: str, index: int = 0) -> Device:
    return CudaDevice(index) if kind == DeviceKind.CUDA else CpuDevice()


def device_facts(device: Device) -> dict[str, Any]:
    """The device as a report describes it."""
    import torch

    facts: dict[str, Any] = {"type": device.type, "name": device.name(), "total_memory_bytes": device.total_memory(),
                             "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        facts["cuda"] = torch.version.cuda
    return facts


def nvml_reader_for(device: Device, factory: NvmlFactory) -> tuple[NvmlReader | None, dict[str, Any], str | None]:
    """(NVML reader for this process on the device's card, facts for the report, why NVML is not used).

    The card is found by UUID or PCI bus id (never by index: NVML numbers cards physically)."""
    if device.type != "cuda":
        return None, {}, None
    backend, why = factory()
    if backend is None:
        return None, {}, why
    identity = device.identity()
    assert identity is not None
    try:
        handle, matched_by = find_nvml_device(backend, identity)
    except LookupError as exc:
        return None, {}, str(exc)
    facts = {"nvml_name": backend.name(handle), "nvml_matched_by": matched_by, "driver": backend.driver_version(),
             "uuid": identity.uuid, "pci_bus_id": identity.pci_bus_id}
    return NvmlReader(backend, handle, os.getpid()), facts, None
