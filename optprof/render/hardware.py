"""The hardware catalog as a table (`optprof gpus`) and as plain records (`-f json`)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from optprof.hardware.catalog import CATALOG, Catalog


def catalog_records(catalog: Catalog) -> dict[str, Any]:
    """Every entry in SI units (bytes, FLOP/s, bytes/s, seconds), with its sources."""
    import dataclasses

    return {"gpus": [dataclasses.asdict(gpu) for gpu in catalog.gpus.values()],
            "networks": [dataclasses.asdict(network) for network in catalog.networks.values()]}


def gpus_table(catalog: Catalog) -> Group:
    gpus = Table(title="GPUs (peaks dense, from datasheets; efficiencies from published microbenchmarks)",
                 title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for column, justify in (("name", "left"), ("memory\nGiB", "right"), ("bf16\nTFLOP/s", "right"),
                            ("fp8\nTFLOP/s", "right"), ("HBM\nGB/s", "right"), ("SMs", "right"),
                            ("matmul\neff.", "right"), ("attn.\neff.", "right"), ("NVLink\nGB/s", "right"),
                            ("PCIe\nGB/s", "right"), ("node\nbusbw GB/s", "right"), ("context\nMiB", "right"),
                            ("NCCL ch.\n(NVLS)", "right"), ("link", "left")):
        gpus.add_column(column, justify=justify, no_wrap=column != "link")  # type: ignore[arg-type]
    for gpu in catalog.gpus.values():
        fp8 = gpu.peak_flops.get("fp8")
        gpus.add_row(gpu.name, f"{gpu.memory_bytes / 2**30:.1f}", f"{gpu.peak('bf16') / 1e12:,.0f}",
                     "-" if fp8 is None else f"{fp8 / 1e12:,.0f}", f"{gpu.memory_bandwidth / 1e9:,.0f}", str(gpu.sms),
                     f"{gpu.matmul_efficiency:.0%}", f"{gpu.attention_efficiency:.0%}",
                     f"{gpu.nvlink_bandwidth / 1e9:,.0f}" if gpu.nvlink_bandwidth else "-",
                     f"{gpu.pcie_bandwidth / 1e9:,.0f}", f"{gpu.intra_node_busbw / 1e9:,.0f}",
                     f"{gpu.context_bytes >> 20:,}",
                     f"{gpu.nccl_channels}" + (f" ({gpu.nvls_channels})" if gpu.nvls_channels else ""), gpu.link)
    networks = Table(title="Networks between nodes (per GPU)", title_justify="left", box=box.SIMPLE_HEAD,
                     pad_edge=False, padding=(0, 1))
    for column in ("name", "busbw GB/s", "latency µs", "what"):
        networks.add_column(column, justify="right" if column[0] in "bl" else "left")
    for network in catalog.networks.values():
        networks.add_row(network.name, f"{network.busbw / 1e9:,.1f}", f"{network.latency_s * 1e6:,.0f}",
                         network.description)
    legend = Text(f"Every figure's source is in {CATALOG} (and in -f json); --gpu-spec FILE.toml adds or "
                  "overrides entries. GiB = 2^30 bytes.", style="dim")
    return Group(gpus, networks, legend)
