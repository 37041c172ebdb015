"""What each command was asked to do: frozen dataclasses built by the CLI from its flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSelection:
    model: str  # bundled name, hub alias, local folder or hub id
    dtype: str = "float32"  # parameter (and so gradient and state) dtype
    revision: str | None = None  # hub revision; ignored for bundled and local configs
    trust_remote_code: bool = False


@dataclass(frozen=True)
class StateSizeConfig:
    model: ModelSelection
    optimizers: tuple[str, ...]  # registry names or package.module:Class paths, as the user gave them
    opt_args: dict[str, Any] = field(default_factory=dict)  # passed to every selected optimizer
    jobs: int = 1  # optimizers measured at once, in forked worker processes
    gpus: int = 1  # > 1: FSDP2 over a fake process group of this many ranks; state per rank
    strategy: str = "fsdp"


@dataclass(frozen=True)
class TrainingSettings:
    """How one training step is run and timed; the same for every optimizer in a comparison."""

    device: str = "cpu"  # "cuda" or "cpu"; the CLI picks cuda when available
    amp: str | None = None  # "bf16" or "fp16": fp32 master weights with autocast; None: pure `dtype`
    seq_len: int | None = None  # tokens per sequence; None: the model's context length, capped (compare.py)
    micro_batch: int = 1  # sequences per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float | None = None  # max gradient norm; None: no clipping (which costs memory and time)
    gradient_checkpointing: bool = False
    steps: int = 10  # timed optimizer steps
    warmup: int = 2  # untimed steps first: Adam-style state is allocated lazily in the first step
    sample_interval_s: float = 0.02  # background memory sampler period (RSS, NVML)
    sampler: bool = True  # False only to measure the sampler's own cost
    breakdown: bool = True  # one extra untimed step under torch's MemTracker: tensor-level peak by category
    peak_tflops: float | None = None  # device peak for MFU when optprof does not know the device
    memory_limit_bytes: int | None = None  # CUDA: the allocator is capped here (emulates a smaller card)
    seed: int = 0  # same weights and tokens for every optimizer


@dataclass(frozen=True)
class SearchSettings:
    """`--micro-batch auto`: find the largest micro-batch whose step fits, then measure there."""

    memory_limit_bytes: int | None = None  # None: the card's memory (CUDA only; a CPU needs a limit)
    max_micro_batch: int = 256  # the search never tries more
    margin: float = 0.0  # fraction of the limit to leave free when choosing the size to measure
    start: int | None = None  # a first guess, e.g. a prediction


@dataclass(frozen=True)
class CompareConfig:
    model: ModelSelection
    optimizers: tuple[str, ...]
    training: TrainingSettings
    opt_args: dict[str, Any] = field(default_factory=dict)
    search: SearchSettings | None = None  # None: measure at training.micro_batch
    gpus: int = 1  # ranks per trial (on cpu: processes with gloo)
    strategy: str = "fsdp"  # with gpus > 1: "ddp" or "fsdp"
    torchrun: bool = False  # already a rank of a torchrun group: join it instead of spawning ranks
    trial_timeout_s: float = 1800.0  # one optimizer's trial, start-up included; then it is stopped and failed


@dataclass(frozen=True)
class PredictConfig:
    """`optprof predict`: the training step on fake tensors; `training.device` is the target device."""

    model: ModelSelection
    optimizers: tuple[str, ...]
    training: TrainingSettings
    opt_args: dict[str, Any] = field(default_factory=dict)
    gpu_memory_bytes: int | None = None  # memory per device; None: predict the peak only, no largest micro-batch
    reserve_bytes: int = 0  # per device, beyond tensors: CUDA context, workspaces, allocator slack
    max_micro_batch: int = 256
    gpus: int = 1  # ranks; > 1 runs FSDP2 over a fake process group in this one process
    strategy: str = "fsdp"  # with gpus > 1: "fsdp" (fully_shard per transformer block, then the root)
