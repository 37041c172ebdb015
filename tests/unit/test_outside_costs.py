"""What sits outside the caching allocator, per GPU kind and topology (hardware catalog), the flash backward's
scratch in the trace, and --calibration from a compare report measured on the card."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from support.cli import run

from optprof.config import Strategy
from optprof.device.costs import Group, communicator_groups, rank_costs
from optprof.device.trace import TraceRecorder
from optprof.hardware.catalog import load_catalog

MIB = 1 << 20


def _costs(gpu: str, ranks: int, strategy: Strategy = Strategy.FSDP, shard: int | None = None) -> dict[str, int]:
    return {c.name: c.bytes for c in rank_costs(strategy, ranks, shard, load_catalog().gpu(gpu), min(8, ranks))}


def test_each_cards_costs_by_hand() -> None:
    # h100-sxm x 8: context 758 MiB (measured on an H200); one communicator: 32 channels x 12 MiB ring buffers
    # + NVLS 16 channels x 2 MiB x 8 GPUs = 384 + 256 MiB
    assert _costs("h100-sxm", 8) == {"CUDA context": 758 * MIB, "NCCL communicator (8 ranks)": 640 * MIB}
    # a100-80gb x 2: 481 + 277 MiB context; 24 channels x 12 MiB, no NVLS on A100
    assert _costs("a100-80gb", 2) == {"CUDA context": 758 * MIB, "NCCL communicator (2 ranks)": 288 * MIB}
    # rtx-4090 x 1: AD102's 426 MiB bare context + 277 MiB; no communicator on one GPU
    assert _costs("rtx-4090", 1) == {"CUDA context": 703 * MIB}
    assert _costs("rtx-4090", 2)["NCCL communicator (2 ranks)"] == 0  # SHM: the buffers are in host memory


def test_hsdp_groups_know_which_ranks_share_a_node_and_add_the_world_group() -> None:
    # 2 nodes x 8: the shard group is one node's 8 GPUs; the replica group joins one GPU of each node
    assert communicator_groups((2, 8), 8) == [Group(2, 1), Group(8, 8), Group(16, 8, world=True)]
    assert communicator_groups((2, 4), 8) == [Group(2, 2), Group(4, 4), Group(8, 8, world=True)]
    assert communicator_groups((8,), 8) == [Group(8, 8)]  # a 1-D mesh over the world is the default group
    costs = _costs("h100-sxm", 16, Strategy.HSDP, 8)
    assert costs["NCCL communicator (2 ranks)"] == 384 * MIB  # across nodes: no NVLS
    assert costs["NCCL world group (16 ranks)"] == 640 * MIB


def test_the_flash_backward_scratch_is_allocated_after_its_outputs_and_freed_as_it_returns() -> None:
    q, k, v = (torch.randn(2, 4, 100, 16, requires_grad=True) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    recorder = TraceRecorder(workspace_bytes=1)  # a CUDA target's recorder
    with recorder.recording() as trace:
        out.sum().backward()
    scratch = [e for e in trace.events if e.alloc and trace.tags.get(e.id) == "attention workspace"]
    # dq_accum fp32 (2, 128, 4, 32): seq 100 rounded to 128, head dim 16 to 32; softmax_d fp32 (2, 4, 128)
    assert [e.size for e in scratch] == [4 * 2 * 128 * 4 * 32, 4 * 2 * 4 * 128]
    freed = {e.id for e in trace.events if not e.alloc}
    assert all(e.id in freed for e in scratch)
    plain = TraceRecorder()  # a CPU target: no scratch
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with plain.recording() as cpu_trace:
        out.sum().backward()
    assert "attention workspace" not in cpu_trace.tags.values()


def test_calibration_replaces_the_catalogs_costs(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(["compare", "demo", "-o", "sgd", "--device", "cpu", "--seq-len", "16", "--steps", "2",
                        "--no-predict", "--no-breakdown", "-f", "json"], capsys)
    assert code == 0
    report = json.loads(out)
    cpu_run = tmp_path / "cpu.json"
    cpu_run.write_text(out)
    code, _, err = run(["predict", "demo", "-o", "sgd", "--calibration", str(cpu_run)], capsys)
    assert code == 2 and "measured nothing outside the allocator" in err and err.count("\n") == 1
    report["results"][0]["outside_allocator_bytes"] = 900_000_000  # as a compare on a card records it
    card = tmp_path / "card.json"
    card.write_text(json.dumps(report))
    code, out, _ = run(["predict", "demo", "-o", "sgd", "--seq-len", "16", "--calibration", str(card), "-f",
                        "json"], capsys)
    assert code == 0
    predicted = json.loads(out)
    assert predicted["config"]["reserve_bytes"] == 900_000_000
    row = predicted["results"][0]
    assert row["predicted_device_bytes"] == row["predicted_reserved_bytes"] + 900_000_000
    code, _, err = run(["predict", "demo", "--reserve", "1GB", "--calibration", str(card)], capsys)
    assert code == 2 and "give one" in err  # --reserve and --calibration are one choice
