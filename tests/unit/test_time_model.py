"""The time model: the catalog, each op's cost by hand arithmetic, the stream timeline, the ops a fake step records,
and predict's time figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.cli import run

from optprof.device.ops import OpKind, OpRecord
from optprof.device.timeline import collective_seconds, kernel_seconds, quantization, step_time
from optprof.errors import UsageError
from optprof.hardware.catalog import Cluster, cluster, load_catalog

REQUIRED = ("h100-sxm", "h100-pcie", "h100-nvl", "h200", "a100-40gb", "a100-80gb", "a800", "b200", "l40s",
            "rtx-4090", "rtx-a6000", "mi300x")


def op(kind: OpKind, flops: int = 0, moved: int = 0, reads: tuple[int, ...] = (), writes: tuple[int, ...] = (),
       stream: str = "default", phase: str = "forward", name: str = "aten.x", **extra: object) -> OpRecord:
    return OpRecord(name, kind, stream, phase, flops, moved, "bf16", reads, writes, **extra)  # type: ignore[arg-type]


def test_every_required_gpu_is_in_the_catalog_with_a_source_for_every_figure() -> None:
    catalog = load_catalog()
    assert set(REQUIRED) <= set(catalog.gpus)
    for gpu in catalog.gpus.values():
        assert gpu.peak("bf16") > gpu.peak("fp32") > 0 and gpu.memory_bytes > 20 * 2**30
        assert 0 < gpu.matmul_efficiency <= 1 and 0 < gpu.memory_efficiency <= 1 and 0 < gpu.attention_efficiency <= 1
        figures = ("memory_mib", "bf16_tflops", "hbm_gb_s", "sms", "matmul_efficiency", "memory_efficiency",
                   "attention_efficiency", "launch_us", "intra_node_busbw_gb_s", "intra_node_latency_us", "nvlink_gb_s",
                   "pcie_gb_s")
        assert all(gpu.sources.get(figure) for figure in figures), gpu.name
    assert catalog.gpus["h100-sxm"].peak("bf16") == pytest.approx(989.4e12)
    assert catalog.gpus["a100-80gb"].memory_bandwidth == pytest.approx(2039e9)
    assert all(network.sources.get("busbw_gb_s") for network in catalog.networks.values())


def test_a_gpu_spec_overrides_one_figure_and_adds_a_card(tmp_path: Path) -> None:
    spec = tmp_path / "capped.toml"
    spec.write_text('[gpu.h100-sxm]\nbf16_tflops = 700\n\n[gpu.mine]\ndescription = "a card"\nmemory_mib = 1024\n'
                    'bf16_tflops = 10\nfp32_tflops = 1\nhbm_gb_s = 100\nsms = 10\nmatmul_efficiency = 0.5\n'
                    'memory_efficiency = 0.5\nattention_efficiency = 0.5\nlaunch_us = 5\nintra_node_busbw_gb_s = 1\n'
                    'intra_node_latency_us = 10\nlink = "PCIe"\n')
    catalog = load_catalog(spec)
    assert catalog.gpus["h100-sxm"].peak("bf16") == pytest.approx(700e12)
    assert catalog.gpus["h100-sxm"].memory_bandwidth == pytest.approx(3350e9)  # the rest kept
    assert catalog.gpus["mine"].memory_bytes == 2**30
    spec.write_text("[gpu.h100-sxm]\nbf16_tflopz = 1\n")
    with pytest.raises(UsageError, match="unknown field 'bf16_tflopz'"):
        load_catalog(spec)
    with pytest.raises(UsageError, match="unknown GPU 'h1000'"):
        load_catalog().gpu("h1000")


def test_tile_and_wave_quantization_by_hand() -> None:
    # 8192 x 2048 in 256 x 128 tiles: 32 x 16 = 512 tiles over 132 SMs = 4 waves (528 slots): 512 / 528
    assert quantization(8192, 2048, 132) == pytest.approx(512 / 528)
    # one 128 x 128 tile on 132 SMs: one SM busy (64 x 64 tiles would be 4: 4 / 132)
    assert quantization(128, 128, 132) == pytest.approx(4 / 132)
    assert quantization(132 * 128, 128, 132) == pytest.approx(1.0)


def test_a_kernel_is_the_roofline_of_its_compute_and_its_bytes() -> None:
    gpu = load_catalog().gpu("h100-sxm")
    flops = 2 * 8192 * 8192 * 8192
    matmul = op(OpKind.MATMUL, flops, 3 * 8192 * 8192 * 2, mnk=(1, 8192, 8192, 8192))
    expected = flops / (989.4e12 * gpu.matmul_efficiency * quantization(8192, 8192, 132))
    assert kernel_seconds(matmul, gpu) == pytest.approx(expected)
    copy = op(OpKind.MEMORY, 0, 2 * 2**30)
    assert kernel_seconds(copy, gpu) == pytest.approx(2 * 2**30 / (3350e9 * gpu.memory_efficiency))
    assert kernel_seconds(op(OpKind.MEMORY, 0, 8), gpu) == gpu.launch_s  # a tiny op: its launch


def test_ring_collectives_inside_a_node_and_across_nodes() -> None:
    catalog = load_catalog()
    gpu = catalog.gpu("h100-sxm")
    inside = cluster(catalog, "h100-sxm", None, None, 8)
    gather = op(OpKind.COLLECTIVE, 0, 8 * 2**20, name="all-gather", group=tuple(range(8)))
    assert collective_seconds(gather, inside) == pytest.approx(gpu.intra_node_latency_s + 8 * 2**20 * 7 / 8 /
                                                              gpu.intra_node_busbw)
    reduce = op(OpKind.COLLECTIVE, 0, 8 * 2**20, name="all-reduce", group=tuple(range(8)))
    assert collective_seconds(reduce, inside) == pytest.approx(gpu.intra_node_latency_s + 8 * 2**20 * 14 / 8 /
                                                              gpu.intra_node_busbw)
    across = Cluster(gpu, catalog.network("ib-400g"), 4)  # 8 ranks over 2 nodes of 4: the network decides
    assert collective_seconds(gather, across) == pytest.approx(30e-6 + 8 * 2**20 * 7 / 8 / 42.5e9)


def test_the_timeline_overlaps_a_prefetched_all_gather_and_exposes_the_one_compute_waits_on() -> None:
    """all-gather A (1 ms) then compute (2 ms) that does not need it, then compute reading A's output: hidden. Then
    all-gather B (3 ms) issued just before the compute that reads it: 3 ms exposed, minus launch."""
    costs = {"ag-a": 1e-3, "c1": 2e-3, "c2": 1e-3, "ag-b": 3e-3, "c3": 1e-3}
    ops = [op(OpKind.COLLECTIVE, name="ag-a", stream="all-gather", writes=(1,), group=(0, 1)),
           op(OpKind.MEMORY, name="c1", writes=(2,)),
           op(OpKind.MEMORY, name="c2", reads=(1,), writes=(3,)),
           op(OpKind.COLLECTIVE, name="ag-b", stream="all-gather", writes=(4,), group=(0, 1)),
           op(OpKind.MEMORY, name="c3", reads=(4,), phase="backward")]
    timed = step_time(ops, lambda o: costs[o.name], 0.0)
    # c1 0-2, c2 2-3 (A done at 1), B 0... B waits for its stream: A ends at 1, B issued at 0: runs 1-4; c3 4-5
    assert timed.step_s == pytest.approx(5e-3)
    assert timed.phase_s["exposed_communication"] == pytest.approx(1e-3)
    assert timed.phase_s["forward"] == pytest.approx(3e-3) and timed.phase_s["backward"] == pytest.approx(1e-3)
    assert sum(timed.phase_s.values()) == pytest.approx(timed.step_s)
    assert timed.communication_s == pytest.approx(4e-3)


def test_launch_bound_ops_make_the_host_the_bottleneck() -> None:
    ops = [op(OpKind.MEMORY, name=str(i)) for i in range(100)]
    timed = step_time(ops, lambda o: 1e-6, 5e-6)  # 1 us kernels, 5 us to issue each
    assert timed.step_s == pytest.approx(100 * 5e-6 + 1e-6)
    assert timed.compute_s == pytest.approx(100e-6)


def test_a_recorded_matmul_has_torchs_flops_and_its_operands_bytes() -> None:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from optprof.device.trace import TraceRecorder

    recorder = TraceRecorder(ops=True)
    with FakeTensorMode():
        a, b = torch.empty(64, 32), torch.empty(32, 16)
        with recorder.recording():
            (a @ b).relu_()
    matmul, relu = recorder.trace.ops
    assert (matmul.kind, matmul.flops, matmul.mnk) == (OpKind.MATMUL, 2 * 64 * 32 * 16, (1, 64, 16, 32))
    assert matmul.bytes == (64 * 32 + 32 * 16 + 64 * 16) * 4
    assert relu.kind == OpKind.MEMORY and relu.reads == matmul.writes == relu.writes  # in place, after the matmul


def test_predict_on_a_catalog_gpu_reports_time_tokens_and_mfu(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(["predict", "demo", "-o", "adamw", "--gpu", "h100-sxm", "--gpus", "2", "--seq-len", "64",
                        "--max-micro-batch", "2", "-f", "json"], capsys)
    assert code == 0
    report = json.loads(out)
    row = report["results"][0]
    phases = row["predicted_phase_s"]
    assert set(phases) == {"forward", "backward", "optimizer", "exposed_communication"}
    assert sum(phases.values()) == pytest.approx(row["predicted_step_s"])
    assert row["predicted_communication_s"] > 0  # FSDP2's all-gathers and reduce-scatters over 2 ranks
    tokens = row["micro_batch"] * 64
    assert row["predicted_tokens_per_s_per_gpu"] == pytest.approx(tokens / row["predicted_step_s"])
    assert row["predicted_tokens_per_s"] == pytest.approx(2 * row["predicted_tokens_per_s_per_gpu"])
    assert 0 < row["predicted_mfu"] < 1 and row["predicted_step_s_at_max"] > row["predicted_step_s"]
    assert report["config"]["gpu_memory_bytes"] == 81559 * 2**20  # the card's memory by default
    assert any(note.startswith("time (predicted") for note in report["assumptions"])


def test_unknown_gpu_and_network_are_one_line(capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(["predict", "demo", "--gpu", "h1000"], capsys)
    assert code == 2 and "unknown GPU 'h1000'" in err and "Traceback" not in err
    code, _, err = run(["predict", "demo", "--gpu", "h100-sxm", "--network", "carrier-pigeon"], capsys)
    assert code == 2 and "unknown network" in err
    code, _, err = run(["predict", "demo", "--network", "ib-400g"], capsys)
    assert code == 2 and "give --gpu NAME too" in err


def test_gpus_lists_the_catalog(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(["gpus", "-f", "json"], capsys)
    assert code == 0
    listed = json.loads(out)
    assert {gpu["name"] for gpu in listed["gpus"]} >= set(REQUIRED)
    assert all(gpu["sources"]["bf16_tflops"] for gpu in listed["gpus"])


def test_without_overlap_a_collective_takes_the_compute_engine_and_is_all_exposed() -> None:
    costs = {"c1": 2e-3, "ag": 1e-3, "c2": 2e-3}
    ops = [op(OpKind.MEMORY, name="c1", writes=(1,)),
           op(OpKind.COLLECTIVE, name="ag", stream="all-gather", writes=(2,), group=(0, 1)),
           op(OpKind.MEMORY, name="c2", writes=(3,))]  # independent of the all-gather: would overlap on a GPU
    assert step_time(ops, lambda o: costs[o.name], 0.0).step_s == pytest.approx(4e-3)
    serial = step_time(ops, lambda o: costs[o.name], 0.0, overlap=False)
    assert serial.step_s == pytest.approx(5e-3)
    assert serial.phase_s["exposed_communication"] == pytest.approx(1e-3)


@pytest.mark.parametrize("width", [80, 100, 160])
def test_predicts_tables_never_cut_a_number(width: int) -> None:
    import io

    from rich.console import Console

    from optprof.render.fit import fit_tables
    from optprof.render.tables import predict_table
    from optprof.results.io import read_report
    from optprof.results.reports import PredictReport

    report = read_report(Path(__file__).parent.parent / "data" / "predict-a800.json")  # a saved predict --gpu a800
    assert isinstance(report, PredictReport)
    terminal = Console(file=io.StringIO(), width=width, soft_wrap=False)
    terminal.print(fit_tables(predict_table(report, "gb"), terminal))
    printed = terminal.file.getvalue()  # type: ignore[attr-defined]
    assert "…" not in printed
    for figure in ("3,515", "4,095", "60.5%", "84.68", "2,000.5", "1,203.6"):
        assert figure in printed
    assert all(len(line) <= width for line in printed.splitlines())
