"""Flag values -> settings: the model selection, sizes and the checks that several commands make alike.

Everything here raises `UsageError` (one line, exit 2) on bad input; nothing imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from optprof.config import (
    SHARDED_STRATEGIES,
    DeviceKind,
    Dtype,
    ModelSelection,
    Strategy,
    TrainingSetup,
    resolve_shard_size,
)
from optprof.errors import UsageError


@dataclass
class Session:
    """What the top-level flags set for the whole run."""

    debug: bool = False  # --debug: tracebacks and library warnings instead of one-line errors


SESSION = Session()


def model_selection(model: str, dtype: Dtype, revision: str | None, trust_remote_code: bool,
                    lora: str | None = None, freeze: list[str] | None = None, qlora: str | None = None,
                    attention: str | None = None) -> ModelSelection:
    """The model and what trains, from the model flags."""
    from optprof.model.setups import parse_lora

    if lora is not None and qlora is not None:
        raise UsageError("--lora and --qlora: give one (--qlora is LoRA on a 4-bit base)")
    spec = lora if qlora is None else qlora
    setup = TrainingSetup(parse_lora(spec) if spec is not None else None, tuple(freeze or ()), qlora is not None,
                          attention)
    return ModelSelection(model, dtype, revision, trust_remote_code, setup)


@dataclass(frozen=True)
class FakeRanks:
    """state-size's and predict's --gpus, --strategy and --shard-size: FSDP2 over a fake process group."""

    ranks: int
    strategy: Strategy
    shard_size: int | None


def fake_ranks(gpus: int | None, strategy: Strategy, shard_size: int | None, command: str) -> FakeRanks:
    """The fake ranks a command shards over; ddp and zero1 are compare's to measure (they replicate the model)."""
    if strategy not in SHARDED_STRATEGIES:
        names = ", ".join(SHARDED_STRATEGIES)
        raise UsageError(f"--strategy {strategy}: {command} shards with FSDP2 ({names}); "
                         f"run `optprof compare --strategy {strategy}` to measure it")
    ranks = gpus or 1
    return FakeRanks(ranks, strategy, resolve_shard_size(strategy, ranks, shard_size, None))


def one_device(gpus: int, save_profile: Path | None) -> None:
    if save_profile is not None and gpus > 1:
        raise UsageError("--save-profile: profiles describe one device for now; drop --gpus")


def loaded_dtype(model: str, revision: str | None, trust_remote_code: bool) -> Dtype:
    """The dtype transformers' from_pretrained gives the model's parameters by default (hf-trainer's)."""
    from optprof.model.loading import default_loaded_dtype, load_config

    return Dtype(default_loaded_dtype(load_config(model, revision=revision, trust_remote_code=trust_remote_code)[0]))


def allocator_settings(device: DeviceKind, alloc_conf: str | None, snapshot: Path | None) -> str | None:
    """The PYTORCH_CUDA_ALLOC_CONF the allocator model follows: --alloc-conf, else the environment's; None for a
    CPU target, which has no caching allocator (asking for one there is an error)."""
    from optprof.device.alloc_conf import ASYNC, AllocatorConfig, environment_name

    if device != DeviceKind.CUDA:
        if alloc_conf is not None or snapshot is not None:
            raise UsageError("--alloc-conf and --memory-snapshot model CUDA's caching allocator: use --device cuda")
        return None
    config = AllocatorConfig.checked(alloc_conf)
    if config.backend == ASYNC:
        source = "--alloc-conf" if alloc_conf is not None else environment_name()
        raise UsageError(f"{source}: backend:cudaMallocAsync hands memory to CUDA's stream-ordered pool, whose "
                         "reuse and release the caching-allocator model does not follow: predict without it "
                         "(the native allocator), or measure with compare on the card")
    return config.text()


def outside_reserve(device: DeviceKind, ranks: int, strategy: Strategy, shard_size: int | None,
                    modelled: bool, gpu: str | None = None, gpu_spec: Path | None = None,
                    gpus_per_node: int | None = None) -> int:
    """Bytes per device outside the allocator: the named costs with the model (the catalog's for --gpu), else the
    old default reserve."""
    from optprof.config import default_reserve
    from optprof.device.costs import rank_costs
    from optprof.hardware.catalog import DEFAULT_GPUS_PER_NODE, target_gpu

    if not modelled:
        return default_reserve(device)
    per_node = gpus_per_node or min(DEFAULT_GPUS_PER_NODE, ranks)
    return sum(cost.bytes for cost in rank_costs(strategy, ranks, shard_size, target_gpu(gpu, gpu_spec), per_node))


def calibration_bytes(path: Path) -> int:
    """The largest outside-allocator figure a compare report measured (--calibration); one line, exit 2, when it
    is not a compare report or measured none (a CPU run, or no NVML)."""
    from optprof.results.io import read_report
    from optprof.results.reports import CompareReport

    report = read_report(path)
    if not isinstance(report, CompareReport):
        raise UsageError(f"--calibration: {path} is an {report.SCHEMA} report; give a compare report from the card")
    measured = [row.outside_allocator_bytes for row in report.results if row.outside_allocator_bytes is not None]
    measured += [rank.nvml_process_peak_bytes - rank.torch_max_reserved_bytes for row in report.results
                 for rank in row.ranks
                 if rank.nvml_process_peak_bytes is not None and rank.torch_max_reserved_bytes is not None]
    if not measured:
        raise UsageError(f"--calibration: {path} measured nothing outside the allocator (a compare on a CUDA "
                         "device with NVML records it)")
    return max(measured)


@dataclass(frozen=True)
class TimeTarget:
    memory_bytes: int | None  # the catalog GPU's memory (the default --gpu-memory); None for local or no --gpu


def time_settings(gpu: str | None, spec: Path | None, network: str | None, gpus_per_node: int | None,
                  device: DeviceKind, gpus: int) -> TimeTarget:
    """Check --gpu, --gpu-spec, --network and --gpus-per-node before any work (one line, exit 2, on a mistake)."""
    from optprof.hardware.catalog import LOCAL, cluster, load_catalog

    if gpu is None:
        if spec is not None or network is not None or gpus_per_node is not None:
            raise UsageError("--gpu-spec, --network and --gpus-per-node describe the --gpu: give --gpu NAME too")
        return TimeTarget(None)
    if gpu == LOCAL:
        if device == DeviceKind.CUDA:
            import torch

            if not torch.cuda.is_available():
                raise UsageError("--gpu local times ops on this machine's device, which has no CUDA: add --device cpu")
        return TimeTarget(None)
    chosen = cluster(load_catalog(spec), gpu, network, gpus_per_node, gpus)
    return TimeTarget(chosen.gpu.memory_bytes)
