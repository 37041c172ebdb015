"""The measuring parts on their own: NVML matching and sampling (fake backend), the CUDA device (fake
torch.cuda), a whole trial through the GPU branches without CUDA, process isolation, and small helpers."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable

import pytest
import support.isolate_targets as targets
from support.fake_gpu import GIB, CudaOnCpu, FakeCard, FakeCuda, FakeNvml
from support.processes import left_behind

from optprof.config import ModelSelection, TrainingSettings
from optprof.measure.device import CudaDevice
from optprof.measure.flops import matmul_weights, model_flops_per_token, peak_flops
from optprof.measure.nvml import NvmlReader, TorchDeviceIdentity, find_nvml_device
from optprof.measure.sampler import MemorySampler
from optprof.measure.stats import percentile
from optprof.measure.tracker import EnergyMeter
from optprof.measure.trial import TrialSpec, run_trial
from optprof.model.loading import load_model
from optprof.processes.isolated import exit_reason, run_isolated

TORCH_UUID = "1a2b3c4d-0000-1111-2222-333344445555"  # torch's form: no "GPU-" prefix
PID = os.getpid()
OTHER_PID = PID + 1


def two_cards(**ours: object) -> FakeNvml:
    """NVML sees two cards; torch's device 0 is NVML's index 1 (as with CUDA_VISIBLE_DEVICES=1)."""
    other = FakeCard(uuid="GPU-ffffffff-0000-1111-2222-333344445555", bus_id="00000000:17:00.0",
                     used=[70 * GIB], processes=[{OTHER_PID: 60 * GIB}], energy_mj=[9_000_000])
    mine = FakeCard(uuid="GPU-" + TORCH_UUID.upper(), bus_id="00000000:65:00.0", **ours)  # type: ignore[arg-type]
    return FakeNvml([other, mine])


# NVML device matching


def test_torch_device_matched_to_nvml_by_uuid_not_index() -> None:
    nvml = two_cards()
    handle, how = find_nvml_device(nvml, TorchDeviceIdentity(0, "H100", TORCH_UUID, None))
    assert handle is nvml.cards[1] and how == "uuid"


def test_pci_bus_id_when_torch_has_no_uuid() -> None:
    nvml = two_cards()
    handle, how = find_nvml_device(nvml, TorchDeviceIdentity(0, "H100", None, "0000:65:00.0"))
    assert handle is nvml.cards[1] and how == "pci bus id"  # 4- and 8-digit domains compare equal


def test_no_matching_nvml_device_is_an_error_not_a_guess() -> None:
    with pytest.raises(LookupError, match="no NVML device"):
        find_nvml_device(two_cards(), TorchDeviceIdentity(0, "H100", "deadbeef", "0000:99:00.0"))


# The sampler


def test_sampler_peaks_per_process_memory_and_energy_delta() -> None:
    nvml = two_cards(used=[10 * GIB, 30 * GIB, 20 * GIB],
                     processes=[{PID: 4 * GIB, OTHER_PID: 50 * GIB}, {PID: 9 * GIB}, {PID: 5 * GIB}],
                     energy_mj=[1_000_000, 1_250_500])
    reader = NvmlReader(nvml, nvml.cards[1], PID)
    rss = iter([100, 300, 200] + [150] * 10_000)
    with EnergyMeter(reader) as energy, MemorySampler(0.001, reader, rss=lambda: next(rss)) as sampler:
        time.sleep(0.05)
    result = sampler.result
    assert result is not None and result.samples >= 2
    assert result.nvml_device_peak_bytes == 30 * GIB
    assert result.nvml_process_peak_bytes == 9 * GIB  # the other process's 50 GiB is not ours
    assert energy.result == pytest.approx(250.5)  # mJ counter, read at both ends
    assert result.rss_peak_bytes == 300


def test_sampler_without_process_figures_or_energy_counter() -> None:
    nvml = two_cards(processes=[{PID: None}], energy_mj=None)  # containers often hide per-process memory
    reader = NvmlReader(nvml, nvml.cards[1], PID)
    with EnergyMeter(reader) as energy, MemorySampler(0.001, reader) as sampler:
        pass
    assert sampler.result is not None
    assert sampler.result.nvml_process_peak_bytes is None and energy.result is None
    assert sampler.result.rss_peak_bytes > 0  # the real RSS of this process


# The CUDA device over a fake torch.cuda


def test_cuda_device_reads_the_allocator_and_its_identity() -> None:
    cuda = FakeCuda({"allocated_bytes.all.peak": 5 * GIB, "reserved_bytes.all.peak": 6 * GIB,
                     "num_alloc_retries": 3, "num_ooms": 1})
    device = CudaDevice(0, cuda)
    stats = device.allocator_stats()
    assert (stats.max_allocated_bytes, stats.max_reserved_bytes, stats.alloc_retries, stats.ooms) == (
        5 * GIB, 6 * GIB, 3, 1)
    identity = device.identity()
    assert identity.uuid == TORCH_UUID and identity.pci_bus_id == "0000:65:00.0"
    start = device.mark()
    time.sleep(0.01)
    end = device.mark()
    assert 0.005 < device.seconds(start, end) < 1.0  # event milliseconds converted to seconds
    device.reset_peaks()
    assert cuda.resets == 1


def tiny_spec(model: str, optimizer: str, **training: object) -> TrialSpec:
    settings = {"device": "cpu", "seq_len": 16, "steps": 2, "sample_interval_s": 0.001} | training
    return TrialSpec(ModelSelection(model), optimizer, TrainingSettings(**settings))  # type: ignore[arg-type]


def test_trial_through_the_gpu_branches_without_cuda(model_dir: Callable[[str], str]) -> None:
    stats = {"allocated_bytes.all.peak": 3 * GIB, "reserved_bytes.all.peak": 4 * GIB, "num_alloc_retries": 2,
             "num_ooms": 0}
    cuda = FakeCuda(stats)
    nvml = two_cards(used=[10 * GIB, 12 * GIB], processes=[{PID: 5 * GIB, OTHER_PID: 60 * GIB}],
                     energy_mj=[2_000_000, 2_100_000])
    outcome = run_trial(tiny_spec(model_dir("tiny-llama"), "adamw"), nvml=lambda: (nvml, None),
                        device=CudaOnCpu(cuda))
    row = outcome.row
    assert row.status == "ok", row.reason
    assert (row.peak_bytes, row.peak_source) == (4 * GIB, "torch_max_reserved")
    assert (row.torch_max_allocated_bytes, row.alloc_retries, row.ooms) == (3 * GIB, 2, 0)
    assert row.nvml_device_peak_bytes == 12 * GIB and row.nvml_process_peak_bytes == 5 * GIB
    assert row.energy_j == pytest.approx(100.0)
    assert row.joules_per_token == pytest.approx(100.0 / (16 * 2))  # 16 tokens x 2 timed steps
    assert row.mfu == pytest.approx(row.model_flops_per_token * row.tokens_per_s / 66.9e12)  # H100, fp32
    assert outcome.device["nvml_matched_by"] == "uuid" and outcome.device["driver"] == "570.86.15"
    assert cuda.resets == 1 and cuda.synchronized >= 2 + 2  # one per step, warm-up included
    assert nvml.shut_down
    # the forward+backward peak, in reserved terms: allocated after the first timed backward + the cache gap
    assert row.fwd_bwd_peak_bytes == 3 * GIB + (4 * GIB - 3 * GIB)


def test_a_multi_rank_rows_energy_is_the_sum_over_its_cards(model_dir: Callable[[str], str]) -> None:
    """Each rank reads its own card's energy counter (fake NVML); the group's row sums them, and J/token is
    the group's energy over the group's tokens (before, rank 0's energy stood for all)."""
    from optprof.distributed.folding import fold_ranks

    rows = []
    for joules in (100.0, 250.0):  # rank 0's card, rank 1's card
        nvml = two_cards(processes=[{PID: 5 * GIB}], energy_mj=[2_000_000, 2_000_000 + int(1000 * joules)])
        cuda = FakeCuda({"allocated_bytes.all.peak": 3 * GIB, "reserved_bytes.all.peak": 4 * GIB})
        outcome = run_trial(tiny_spec(model_dir("tiny-llama"), "sgd"), nvml=lambda nvml=nvml: (nvml, None),
                            device=CudaOnCpu(cuda))
        assert outcome.row.energy_j == pytest.approx(joules)
        rows.append(outcome.row)
    folded = fold_ranks(rows, "ddp")
    assert folded.energy_j == pytest.approx(350.0)
    assert [rank.energy_j for rank in folded.ranks] == pytest.approx([100.0, 250.0])
    assert folded.joules_per_token == pytest.approx(350.0 / (16 * 2 * 2))  # 16 tokens x 2 steps x 2 ranks


def test_memory_limit_caps_the_cuda_allocator(model_dir: Callable[[str], str]) -> None:
    cuda = FakeCuda({"reserved_bytes.all.peak": GIB})
    spec = tiny_spec(model_dir("tiny-llama"), "sgd", memory_limit_bytes=20 * GIB)
    row = run_trial(spec, nvml=lambda: (None, "no NVML"), device=CudaOnCpu(cuda)).row
    assert row.status == "ok" and cuda.memory_fraction == 0.25  # 20 of the fake card's 80 GiB


def test_trial_says_why_nvml_is_missing(model_dir: Callable[[str], str]) -> None:
    cuda = FakeCuda({"reserved_bytes.all.peak": GIB})
    row = run_trial(tiny_spec(model_dir("tiny-llama"), "sgd"), nvml=lambda: (None, "NVML unavailable: no driver"),
                    device=CudaOnCpu(cuda)).row
    assert row.status == "ok" and row.nvml_device_peak_bytes is None
    assert "NVML unavailable: no driver" in row.notes
    unmatched = FakeNvml([FakeCard(uuid="GPU-00000000", bus_id="00000000:01:00.0")])
    row = run_trial(tiny_spec(model_dir("tiny-llama"), "sgd"), nvml=lambda: (unmatched, None),
                    device=CudaOnCpu(cuda)).row
    assert any("no NVML device matches" in note for note in row.notes)


def test_injected_out_of_memory_is_a_row_not_a_crash(model_dir: Callable[[str], str]) -> None:
    row = run_trial(tiny_spec(model_dir("tiny-llama"), "support.optimizers:OutOfMemoryOnStep")).row
    assert row.status == "oom" and "out of memory" in (row.reason or "")
    row = run_trial(tiny_spec(model_dir("tiny-llama"), "support.optimizers:BrokenOptimizer")).row
    assert row.status == "failed" and "broken on purpose" in (row.reason or "")


# Process isolation (light targets: no torch in the child)


def test_isolated_result_and_progress() -> None:
    seen: list[str] = []
    result = run_isolated(targets.double_with_progress, 21, timeout_s=60, on_progress=seen.append)
    assert result.value == 42 and result.error is None
    assert seen == ["halfway"]


def test_isolated_exception_crash_and_timeout_leave_no_process() -> None:
    result = run_isolated(targets.raise_value_error, None, timeout_s=60)
    assert result.value is None and result.error == "ValueError: bad input on purpose"
    result = run_isolated(targets.kill_self, None, timeout_s=60)
    assert result.error is not None and "SIGKILL" in result.error and "out-of-memory killer" in result.error
    started = time.monotonic()
    result = run_isolated(targets.sleep_forever, None, timeout_s=3)
    assert result.error is not None and "timed out after 3 s" in result.error
    assert time.monotonic() - started < 30
    assert multiprocessing.active_children() == [] and left_behind() == []


def test_exit_reasons() -> None:
    assert "exited with code 3" in exit_reason(3)
    assert "SIGSEGV" in exit_reason(-11)


# Helpers


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 0.9) == pytest.approx(9.1)
    assert percentile([7.0], 0.9) == 7.0


def test_peak_flops_table() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3", low_precision=True) == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe", low_precision=True) == 756.0e12  # not the SXM figure
    assert peak_flops("NVIDIA A100-SXM4-80GB", low_precision=False) == 19.5e12
    assert peak_flops("Some Future GPU", low_precision=True) is None
    # whole words, not substrings: an L40 is not an L4 (1.5x too high MFU), an L4 not an L40, A100 not A10
    assert peak_flops("NVIDIA L40", low_precision=True) == 181.05e12
    assert peak_flops("NVIDIA L4", low_precision=True) == 121.0e12
    assert peak_flops("NVIDIA A10", low_precision=True) == 125.0e12
    assert peak_flops("NVIDIA L40-48Q", low_precision=False) == 90.5e12  # a vGPU profile name


def test_model_flops_count_a_tied_head_once_and_no_embedding_lookup(model_dir: Callable[[str], str]) -> None:
    loaded = load_model(model_dir("tiny-gpt2"))  # tied: wte is both the lookup and the head
    info = loaded.info
    layers = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32)  # c_attn, c_proj, c_fc, mlp c_proj
    assert matmul_weights(loaded.module) == layers + 128 * 32  # + the head; wpe and the lookup are not matmuls
    expected = 6 * (layers + 128 * 32) + 12 * info.num_layers * info.num_heads * info.head_dim * 16
    assert model_flops_per_token(loaded.module, info, 16) == expected


def test_an_nvml_error_mid_run_is_reported_and_rss_sampling_goes_on() -> None:
    class FailingLater(FakeNvml):
        reads = 0

        def memory_used(self, handle: FakeCard) -> int:
            self.reads += 1
            if self.reads > 2:
                raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
            return super().memory_used(handle)

    nvml = FailingLater(two_cards(used=[7 * GIB], processes=[{PID: 3 * GIB}]).cards)
    rss = iter(range(100, 10**6))
    with MemorySampler(0.001, NvmlReader(nvml, nvml.cards[1], PID), rss=lambda: next(rss)) as sampler:
        time.sleep(0.05)
    result = sampler.result
    assert result is not None and result.nvml_error == "RuntimeError: NVML_ERROR_GPU_IS_LOST"
    assert result.nvml_device_peak_bytes == 7 * GIB and result.nvml_process_peak_bytes == 3 * GIB  # before it
    assert result.samples > 5 and result.rss_peak_bytes == 100 + result.samples - 1  # the thread kept sampling
