"""NVML, behind a small backend interface so that tests can drive it with a fake.

NVML numbers its devices physically, while torch numbers the devices CUDA_VISIBLE_DEVICES leaves visible,
so a torch device is matched to its NVML device by UUID (or PCI bus id), never by index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class NvmlBackend(Protocol):
    """The NVML calls optprof makes. Handles are opaque; byte counts are int; energy is millijoules."""

    def device_count(self) -> int: ...
    def handle(self, index: int) -> Any: ...
    def uuid(self, handle: Any) -> str: ...
    def pci_bus_id(self, handle: Any) -> str: ...
    def name(self, handle: Any) -> str: ...
    def memory_used(self, handle: Any) -> int: ...
    def memory_total(self, handle: Any) -> int: ...
    def process_memory(self, handle: Any) -> dict[int, int | None]: ...  # pid -> bytes (None: not reported)
    def total_energy_mj(self, handle: Any) -> int | None: ...  # None: not supported by this card
    def driver_version(self) -> str: ...
    def shutdown(self) -> None: ...


class PynvmlBackend:
    """The real NVML, through pynvml (package nvidia-ml-py)."""

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()

    def device_count(self) -> int:
        return int(self._nvml.nvmlDeviceGetCount())

    def handle(self, index: int) -> Any:
        return self._nvml.nvmlDeviceGetHandleByIndex(index)

    def uuid(self, handle: Any) -> str:
        return _text(self._nvml.nvmlDeviceGetUUID(handle))

    def pci_bus_id(self, handle: Any) -> str:
        return _text(self._nvml.nvmlDeviceGetPciInfo(handle).busId)

    def name(self, handle: Any) -> str:
        return _text(self._nvml.nvmlDeviceGetName(handle))

    def memory_used(self, handle: Any) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(handle).used)

    def memory_total(self, handle: Any) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(handle).total)

    def process_memory(self, handle: Any) -> dict[int, int | None]:
        processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        return {int(p.pid): (None if p.usedGpuMemory is None else int(p.usedGpuMemory)) for p in processes}

    def total_energy_mj(self, handle: Any) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except self._nvml.NVMLError:  # Volta and newer only; not on every SKU
            return None

    def driver_version(self) -> str:
        return _text(self._nvml.nvmlSystemGetDriverVersion())

    def shutdown(self) -> None:
        self._nvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def open_backend() -> tuple[NvmlBackend | None, str | None]:
    """(the real backend, None), or (None, why NVML cannot be used here)."""
    try:
        return PynvmlBackend(), None
    except Exception as exc:  # library missing, no driver, no permission
        return None, f"NVML unavailable: {exc}"


def normalise_uuid(uuid: str) -> str:
    """NVML says 'GPU-1a2b...', torch says '1a2b...': compare without the prefix, lower case."""
    text = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        text = text.removeprefix(prefix)
    return text


def normalise_bus_id(bus_id: str) -> str:
    """'00000000:65:00.0' (NVML, 8-digit domain) and '0000:65:00.0' compare equal."""
    domain, _, rest = bus_id.strip().lower().partition(":")
    return f"{int(domain, 16):04x}:{rest}" if rest else bus_id.strip().lower()


def smallest_visible_card(backend: NvmlBackend, visible: str | None) -> int | None:
    """The memory of the smallest card CUDA may use, read from NVML so that this process never starts CUDA
    (a context would hold memory on the card while the trials run). `visible`: CUDA_VISIBLE_DEVICES, whose
    entries are NVML indices or UUIDs; unset, every card. None when NVML sees no card that matches."""
    handles = [backend.handle(i) for i in range(backend.device_count())]
    if visible is not None:
        wanted = [entry.strip() for entry in visible.split(",") if entry.strip()]
        by_uuid = {normalise_uuid(backend.uuid(h)): h for h in handles}
        handles = [handles[int(e)] if e.isdigit() and int(e) < len(handles) else by_uuid.get(normalise_uuid(e))
                   for e in wanted]
        handles = [h for h in handles if h is not None]
    return min((backend.memory_total(h) for h in handles), default=None)


@dataclass(frozen=True)
class TorchDeviceIdentity:
    """What torch knows of its device, to find the same card in NVML."""

    index: int  # torch's index (after CUDA_VISIBLE_DEVICES)
    name: str
    uuid: str | None
    pci_bus_id: str | None  # domain:bus:device.function


def find_nvml_device(backend: NvmlBackend, device: TorchDeviceIdentity) -> tuple[Any, str]:
    """The NVML handle of `device` and how it was matched ('uuid' or 'pci bus id'); LookupError if none."""
    handles = [backend.handle(i) for i in range(backend.device_count())]
    if device.uuid:
        wanted = normalise_uuid(device.uuid)
        for handle in handles:
            if normalise_uuid(backend.uuid(handle)) == wanted:
                return handle, "uuid"
    if device.pci_bus_id:
        wanted = normalise_bus_id(device.pci_bus_id)
        for handle in handles:
            if normalise_bus_id(backend.pci_bus_id(handle)) == wanted:
                return handle, "pci bus id"
    raise LookupError(f"no NVML device matches torch device {device.index} ({device.name}, uuid {device.uuid})")


class NvmlReader:
    """Reads one card's figures for one process: what the memory sampler polls."""

    def __init__(self, backend: NvmlBackend, handle: Any, pid: int) -> None:
        self.backend = backend
        self.handle = handle
        self.pid = pid

    def device_used(self) -> int:
        return self.backend.memory_used(self.handle)

    def process_used(self) -> int | None:
        """This process's memory on the card; None when NVML does not report it (some containers, MIG)."""
        return self.backend.process_memory(self.handle).get(self.pid)

    def energy_mj(self) -> int | None:
        return self.backend.total_energy_mj(self.handle)
