"""The hardware catalog: GPUs and inter-node networks as data (catalog.toml beside this file), every figure with
its source. `--gpu-spec FILE.toml` adds entries or overrides single fields of existing ones, in the same format.

Nothing here is fitted to the end-to-end runs that check the time model (../shared/published-runs.md): peaks and
bandwidths come from datasheets, efficiencies from published microbenchmarks, each cited in the TOML.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optprof.errors import UsageError

CATALOG = Path(__file__).with_name("catalog.toml")
LOCAL = "local"  # --gpu local: measured op times on this machine's device instead of a catalog entry
DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")


@dataclass(frozen=True)
class Gpu:
    """One GPU model. Rates in FLOP/s and bytes/s; times in seconds."""

    name: str
    description: str
    memory_bytes: int  # what the driver reports as total (nvidia-smi memory.total), the card's memory
    peak_flops: dict[str, float]  # dense (no sparsity) tensor-core peak per dtype; fp32 is the non-tensor rate
    memory_bandwidth: float  # HBM / GDDR peak, bytes/s
    sms: int  # streaming multiprocessors (compute units on AMD): the waves a matmul's tiles run in
    matmul_efficiency: float  # best achieved fraction of the bf16 peak on large GEMMs (a published MAMF figure)
    memory_efficiency: float  # achieved fraction of memory_bandwidth on streaming kernels (published)
    attention_efficiency: float  # achieved fraction of the bf16 peak by fused (flash) attention, fwd and bwd
    launch_s: float  # host time to issue one eager op (dispatch plus kernel launch)
    intra_node_busbw: float  # NCCL bus bandwidth between GPUs of one node at large messages (nccl-tests), bytes/s
    intra_node_latency_s: float  # NCCL's per-collective latency at small messages inside a node
    link: str  # NVLink 4, PCIe 4, Infinity Fabric: what intra_node_busbw runs over
    nvlink_bandwidth: float = 0.0  # NVLink (or fabric) per GPU, bidirectional, as datasheets give it; bytes/s
    pcie_bandwidth: float = 0.0  # the host link, bidirectional, bytes/s (for reference: collectives use busbw)
    # What sits outside PyTorch's caching allocator, per rank (device/costs.py adds them up by topology)
    context_bytes: int = 512 << 20  # the CUDA context once a training step has loaded its kernels
    nccl_channels: int = 0  # NCCL channels whose connection buffers live on the GPU (0: host buffers, SHM)
    nvls_channels: int = 0  # NVLink SHARP channels on an NVSwitch node with multicast (0: no NVLS)
    cublas_workspace_bytes: int = 4096 * 1024 * 2 + 16 * 1024 * 8  # per (thread, stream), through the allocator
    sources: dict[str, str] = field(default_factory=dict)  # figure -> where it comes from

    def peak(self, dtype: str) -> float:
        """Dense peak FLOP/s for a dtype name of DTYPES (fp16 falls back to bf16's rate, tf32 to fp32's)."""
        fallback = {"fp16": "bf16", "tf32": "fp32", "fp8": "bf16"}
        return self.peak_flops.get(dtype) or self.peak_flops[fallback.get(dtype, "fp32")]


@dataclass(frozen=True)
class Network:
    """An inter-node network, per GPU (rail-optimised: one NIC per GPU)."""

    name: str
    description: str
    busbw: float  # NCCL bus bandwidth per GPU across nodes at large messages, bytes/s
    latency_s: float  # per-collective latency across nodes at small messages
    sources: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Cluster:
    """Where the step runs: the GPU, how many per node, and what joins the nodes."""

    gpu: Gpu
    network: Network
    gpus_per_node: int

    def describe(self, gpus: int) -> str:
        nodes = -(-gpus // self.gpus_per_node)
        between = f", {nodes} nodes over {self.network.name}" if nodes > 1 else ""
        return f"{gpus} x {self.gpu.name} ({self.gpu.link} inside a node{between})"


def _figures(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Each catalog field is `{value = ..., source = "..."}` or a bare value (a user's --gpu-spec)."""
    values, sources = {}, {}
    for key, item in raw.items():
        if isinstance(item, dict) and "value" in item:
            values[key] = item["value"]
            if "source" in item:
                sources[key] = str(item["source"])
        else:
            values[key] = item
    return values, sources


GPU_UNITS = {  # catalog field -> (Gpu field, multiplier to SI units)
    "memory_mib": ("memory_bytes", 1 << 20), "memory_gb": ("memory_bytes", 10**9),
    "hbm_gb_s": ("memory_bandwidth", 1e9), "sms": ("sms", 1), "matmul_efficiency": ("matmul_efficiency", 1),
    "memory_efficiency": ("memory_efficiency", 1), "attention_efficiency": ("attention_efficiency", 1),
    "launch_us": ("launch_s", 1e-6), "intra_node_busbw_gb_s": ("intra_node_busbw", 1e9),
    "intra_node_latency_us": ("intra_node_latency_s", 1e-6), "link": ("link", None),
    "nvlink_gb_s": ("nvlink_bandwidth", 1e9), "pcie_gb_s": ("pcie_bandwidth", 1e9),
    "description": ("description", None), "context_mib": ("context_bytes", 1 << 20),
    "nccl_channels": ("nccl_channels", 1), "nvls_channels": ("nvls_channels", 1),
    "cublas_workspace_kib": ("cublas_workspace_bytes", 1 << 10),
}
PEAK_KEYS = {f"{dtype}_tflops": dtype for dtype in DTYPES}
INTEGER_FIELDS = ("memory_bytes", "sms", "context_bytes", "nccl_channels", "nvls_channels", "cublas_workspace_bytes")
NETWORK_UNITS = {"busbw_gb_s": ("busbw", 1e9), "latency_us": ("latency_s", 1e-6), "description": ("description", None)}


def _convert(values: dict[str, Any], units: dict[str, tuple[str, Any]], where: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in values.items():
        if key in PEAK_KEYS:
            fields.setdefault("peak_flops", {})[PEAK_KEYS[key]] = float(value) * 1e12
            continue
        if key not in units:
            known = ", ".join(sorted([*units, *PEAK_KEYS]))
            raise UsageError(f"{where}: unknown field {key!r} (known: {known})")
        name, scale = units[key]
        if scale is None:
            fields[name] = str(value)
        elif not isinstance(value, int | float) or value < 0:
            raise UsageError(f"{where}: {key} must be a non-negative number, not {value!r}")
        else:
            fields[name] = int(value * scale) if name in INTEGER_FIELDS else value * scale
    return fields


@dataclass(frozen=True)
class Catalog:
    gpus: dict[str, Gpu]
    networks: dict[str, Network]

    def gpu(self, name: str) -> Gpu:
        if name not in self.gpus:
            raise UsageError(f"unknown GPU {name!r} (known: {', '.join(self.gpus)}, or {LOCAL}; "
                             "--gpu-spec FILE.toml adds one)")
        return self.gpus[name]

    def network(self, name: str) -> Network:
        if name not in self.networks:
            raise UsageError(f"unknown network {name!r} (known: {', '.join(self.networks)})")
        return self.networks[name]


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = {kind: {name: dict(entry) for name, entry in base.get(kind, {}).items()} for kind in ("gpu", "network")}
    for kind, entries in extra.items():
        if kind not in ("gpu", "network") or not isinstance(entries, dict):
            raise UsageError(f"--gpu-spec: top-level tables are [gpu.NAME] and [network.NAME], not [{kind}]")
        for name, entry in entries.items():
            if not isinstance(entry, dict):
                raise UsageError(f"--gpu-spec: [{kind}.{name}] must be a table")
            merged[kind].setdefault(name, {}).update(entry)  # an existing entry keeps the fields not given
    return merged


def load_catalog(spec: Path | None = None) -> Catalog:
    """The bundled catalog, with a --gpu-spec file's entries added or overriding fields."""
    raw = _read(CATALOG)
    if spec is not None:
        raw = _merge(raw, _read(spec))
    gpus = {}
    for name, entry in raw.get("gpu", {}).items():
        values, sources = _figures(entry)
        fields = _convert(values, GPU_UNITS, f"[gpu.{name}]")
        missing = [f.name for f in dataclasses.fields(Gpu) if f.name not in fields and f.name != "name"
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing or "bf16" not in fields.get("peak_flops", {}):
            raise UsageError(f"[gpu.{name}] lacks {', '.join(missing) or 'bf16_tflops'}")
        gpus[name] = Gpu(name=name, sources=sources, **fields)
    networks = {}
    for name, entry in raw.get("network", {}).items():
        values, sources = _figures(entry)
        fields = _convert(values, NETWORK_UNITS, f"[network.{name}]")
        if "busbw" not in fields or "latency_s" not in fields:
            raise UsageError(f"[network.{name}] needs busbw_gb_s and latency_us")
        networks[name] = Network(name=name, sources=sources, description=fields.pop("description", name), **fields)
    return Catalog(gpus, networks)


DEFAULT_NETWORK = "ib-400g"  # NDR InfiniBand, one 400 Gb/s NIC per GPU: what current H100/H200/B200 clusters use
DEFAULT_GPUS_PER_NODE = 8  # an HGX / DGX node


def cluster(catalog: Catalog, gpu: str, network: str | None, gpus_per_node: int | None, gpus: int) -> Cluster:
    """The cluster a prediction is for: --gpus-per-node defaults to 8, or the GPU count when smaller."""
    if gpus_per_node is not None and gpus_per_node < 1:
        raise UsageError("--gpus-per-node must be at least 1")
    return Cluster(catalog.gpu(gpu), catalog.network(network or DEFAULT_NETWORK),
                   gpus_per_node or min(DEFAULT_GPUS_PER_NODE, gpus))


def target_gpu(name: str | None, spec: str | Path | None = None) -> Gpu | None:
    """The catalog entry a prediction targets; None without --gpu, or for --gpu local (no catalog figures)."""
    if name is None or name == LOCAL:
        return None
    return load_catalog(None if spec is None else Path(spec)).gpu(name)
