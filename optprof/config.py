"""What each command was asked to do: frozen dataclasses built by the CLI from its flags, and the settings
that several commands resolve the same way (sequence length, training checks, the CUDA reserve)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from optprof.errors import UsageError


class DeviceKind(StrEnum):
    """Where a step runs (or, for predict, the device it is predicted for)."""

    CUDA = "cuda"
    CPU = "cpu"


class Dtype(StrEnum):
    """The stored parameter dtype; gradients and optimizer state follow it."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Amp(StrEnum):
    """Autocast's dtype over float32 master weights."""

    BF16 = "bf16"
    FP16 = "fp16"


class Precision(StrEnum):
    """A dtype as FSDP2's MixedPrecisionPolicy names it (--mp-policy PARAM[,REDUCE])."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def dtype(self) -> Dtype:
        return {Precision.FP32: Dtype.FLOAT32, Precision.BF16: Dtype.BFLOAT16, Precision.FP16: Dtype.FLOAT16}[self]


PRECISION_OF_DTYPE = {Dtype.FLOAT32: Precision.FP32, Dtype.BFLOAT16: Precision.BF16, Dtype.FLOAT16: Precision.FP16}


class Checkpointing(StrEnum):
    """Activation checkpointing of the transformer blocks (the classes that `_no_split_modules` names).

    full: every block recomputed in backward. selective-layer: every K-th block (torchtitan's layer SAC).
    selective-op: inside each block, save the outputs of compute-intensive ops except every second matmul,
    recompute the rest (torchtitan's op SAC, through torch.utils.checkpoint's selective contexts).
    """

    NONE = "none"
    FULL = "full"
    SELECTIVE_OP = "selective-op"
    SELECTIVE_LAYER = "selective-layer"


class FsdpUnits(StrEnum):
    """How FSDP2 groups a model's parameters into units (each all-gathered and freed as one).

    blocks: one unit per transformer block, then the root (embeddings, final norm, head), which FSDP2 keeps
    gathered from forward to backward. ends-gathered: the embeddings their own unit, resharded after forward;
    the final norm and head one unit kept gathered after forward (torchtitan's and accelerate's layout).
    ends-sharded: embeddings and head each their own unit, both resharded after forward (torchtune's
    custom_sharded_layers ['tok_embeddings', 'output']).
    """

    BLOCKS = "blocks"
    ENDS_GATHERED = "ends-gathered"
    ENDS_SHARDED = "ends-sharded"


class UpdateImpl(StrEnum):
    """Which of torch's optimizer implementations runs the update (Adam, AdamW, SGD, ...: their `foreach` and
    `fused` arguments). Left unset, torch chooses by device: foreach on CUDA, the per-tensor for-loop on CPU
    (torch/optim/optimizer.py: `_default_to_fused_or_foreach`). Names as torchtitan's `implementation`."""

    FOREACH = "foreach"  # one kernel per op over every parameter: temporaries for all parameters at once
    FUSED = "fused"  # one kernel per step (`torch._fused_adamw_`): no temporaries
    FOR_LOOP = "for-loop"  # one parameter at a time: temporaries of the largest parameter


CHOICE_ARGS = ("foreach", "fused")  # --opt-arg keys that choose the update's implementation themselves


class Strategy(StrEnum):
    """How ranks share the model.

    ddp: replicate everything. zero1: DDP with the optimizer state sharded (torch's ZeroRedundancyOptimizer,
    whole parameters assigned to ranks). zero2: FSDP2 keeping the parameters gathered after forward
    (reshard_after_forward off): state and gradients sharded, as DeepSpeed's ZeRO stage 2. fsdp: FSDP2 (ZeRO
    stage 3), the default. hsdp: FSDP2 on a 2-D mesh, sharded inside each shard group (a node, as a rule) and
    replicated across groups.
    """

    DDP = "ddp"
    ZERO1 = "zero1"
    ZERO2 = "zero2"
    FSDP = "fsdp"
    HSDP = "hsdp"


STRATEGIES: tuple[Strategy, ...] = tuple(Strategy)
REPLICATED_STRATEGIES: tuple[Strategy, ...] = (Strategy.DDP, Strategy.ZERO1)  # the model under DDP
# FSDP2; also emulated on fake tensors (state-size and predict)
SHARDED_STRATEGIES: tuple[Strategy, ...] = (Strategy.ZERO2, Strategy.FSDP, Strategy.HSDP)

# Default sequence length: the model's context length, capped so that a default run stays quick
# (a CPU step at 2048 tokens is minutes for a 1B model); --seq-len overrides either.
SEQ_LEN_CAP: dict[DeviceKind, int] = {DeviceKind.CUDA: 2048, DeviceKind.CPU: 512}
SEQ_LEN_FALLBACK = 512  # tokens, for models whose config has no context length
MAX_MICRO_BATCH = 256  # sequences: the micro-batch search never tries more (a cap, so a search ends)
DEFAULT_CUDA_RESERVE_BYTES = 2 * 2**30  # CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces, allocator slack


@dataclass(frozen=True)
class LoraSpec:
    """--lora r=16[,alpha=32,dropout=0.05,targets=q_proj+v_proj]: peft's LoraConfig; None: peft's default."""

    r: int
    alpha: int | None = None
    dropout: float | None = None
    targets: tuple[str, ...] | None = None  # module names; None: peft's choice for the architecture


@dataclass(frozen=True)
class TrainingSetup:
    """What trains: every parameter (the default), LoRA adapters on a frozen base, and parameters frozen by name.
    Frozen parameters keep no gradient and no optimizer state."""

    lora: LoraSpec | None = None
    freeze: tuple[str, ...] = ()  # globs on parameter names (fnmatch), e.g. *embed_tokens*
    qlora: bool = False  # with lora: the base's linear layers in 4-bit NF4 (bitsandbytes), as QLoRA
    attention: str | None = None  # transformers' attn_implementation (eager, sdpa); None: transformers' default

    @property
    def is_full(self) -> bool:
        """Every parameter trains, as the model was built: nothing to apply."""
        return self.lora is None and not self.freeze and self.attention is None


@dataclass(frozen=True)
class ModelSelection:
    model: str  # bundled name, hub alias, local folder or hub id
    dtype: Dtype = Dtype.FLOAT32  # parameter (and so gradient and state) dtype
    revision: str | None = None  # hub revision; ignored for bundled and local configs
    trust_remote_code: bool = False
    setup: TrainingSetup = field(default_factory=TrainingSetup)


@dataclass(frozen=True)
class StateSizeConfig:
    model: ModelSelection
    optimizers: tuple[str, ...]  # registry names or package.module:Class paths, as the user gave them
    opt_args: dict[str, Any] = field(default_factory=dict)  # passed to every selected optimizer
    jobs: int = 1  # optimizers measured at once, in forked worker processes
    gpus: int = 1  # > 1: FSDP2 over a fake process group of this many ranks; state per rank
    strategy: Strategy = Strategy.FSDP
    shard_size: int | None = None  # hsdp: ranks per shard group (None: all of them)
    full_model: bool = False  # step the whole model even where copies of its first layers extrapolate exactly


@dataclass(frozen=True)
class TrainingSettings:
    """How one training step is run and timed; the same for every optimizer in a comparison."""

    device: DeviceKind = DeviceKind.CPU  # the CLI picks cuda when available
    amp: Amp | None = None  # autocast in this dtype over the parameters as stored; None: no autocast
    mp_param: Precision | None = None  # FSDP2 MixedPrecisionPolicy: gathered parameters' dtype; None: no policy
    mp_reduce: Precision | None = None  # ... and the gradient reduction's; None: the gathered parameters' dtype
    fsdp_units: FsdpUnits = FsdpUnits.BLOCKS  # how FSDP2 groups parameters (sharded strategies, --mp-policy)
    checkpointing: Checkpointing = Checkpointing.NONE  # activation checkpointing of the transformer blocks
    checkpoint_every: int = 1  # selective-layer: every K-th block is checkpointed
    loss_chunks: int | None = None  # chunked cross-entropy over N chunks of tokens; None: full fp32 logits
    recipe: str | None = None  # the named trainer whose settings these are (trainers.RECIPES), if any
    update_impl: UpdateImpl | None = None  # torch optimizers' implementation; None: torch's choice on the device
    seq_len: int | None = None  # tokens per sequence; None: the model's context length, capped (resolve_seq_len)
    micro_batch: int = 1  # sequences per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float | None = None  # max gradient norm; None: no clipping (which costs memory and time)
    steps: int = 10  # timed optimizer steps
    warmup: int = 2  # untimed steps first: Adam-style state is allocated lazily in the first step
    sample_interval_s: float = 0.02  # background memory sampler period (RSS, NVML)
    sampler: bool = True  # False only to measure the sampler's own cost
    breakdown: bool = True  # one extra untimed step under torch's MemTracker: tensor-level peak by category
    time_optimizer_step: bool = True  # repeat optimizer.step() on one set of gradients: optimizer_step_s, ±95%
    peak_tflops: float | None = None  # device peak for MFU when optprof does not know the device
    memory_limit_bytes: int | None = None  # what a step may use; CUDA caps the allocator here (a smaller card)
    seed: int = 0  # same weights and tokens for every optimizer


@dataclass(frozen=True)
class SearchSettings:
    """`--micro-batch auto`: find the largest micro-batch whose step fits, then measure there. The limit is
    `TrainingSettings.memory_limit_bytes` (None: the card's memory, CUDA only)."""

    max_micro_batch: int = MAX_MICRO_BATCH  # the search never tries more
    margin: float = 0.0  # fraction of the limit to leave free when choosing the size to measure


@dataclass(frozen=True)
class CompareConfig:
    model: ModelSelection
    optimizers: tuple[str, ...]
    training: TrainingSettings
    opt_args: dict[str, Any] = field(default_factory=dict)
    search: SearchSettings | None = None  # None: measure at training.micro_batch
    gpus: int = 1  # ranks per trial (on cpu: processes with gloo)
    strategy: Strategy = Strategy.FSDP  # with gpus > 1
    shard_size: int | None = None  # hsdp: ranks per shard group (None: all of them)
    torchrun: bool = False  # already a rank of a torchrun group: join it instead of spawning ranks
    trial_timeout_s: float = 1800.0  # one optimizer's trial, start-up included; then it is stopped and failed
    predict: bool = True  # also predict each row's peak on fake tensors, here, and report the error
    gpu: str | None = None  # also predict each row's step time on this catalog GPU, or "local" (measured op times)
    gpu_spec: str | None = None  # a TOML file adding or overriding catalog entries
    preflight: bool = True  # decide `unsupported` and `does not fit` on fake tensors before launching a trial
    offload_optimizer: bool = False  # FSDP2's CPUOffloadPolicy: sharded parameters, gradients and state on the host
    memory_snapshot_dir: str | None = None  # CUDA: dump the allocator's history over each tracked step here


@dataclass(frozen=True)
class PredictConfig:
    """`optprof predict`: the training step on fake tensors; `training.device` is the target device."""

    model: ModelSelection
    optimizers: tuple[str, ...]
    training: TrainingSettings
    opt_args: dict[str, Any] = field(default_factory=dict)
    gpu_memory_bytes: int | None = None  # memory per device; None: predict the peak only, no largest micro-batch
    reserve_bytes: int = 0  # per device, beyond tensors: CUDA context, workspaces, allocator slack
    max_micro_batch: int = MAX_MICRO_BATCH
    gpus: int = 1  # ranks; > 1 runs FSDP2 over a fake process group in this one process
    strategy: Strategy = Strategy.FSDP  # with gpus > 1: fully_shard per transformer block, then the root
    shard_size: int | None = None  # hsdp: ranks per shard group (None: all of them)
    layers: int | None = None  # build only the model's first N layers (a shallow copy); None: all of them
    jobs: int = 1  # optimizers predicted at once, in forked worker processes
    replicas: int = 1  # ranks that each hold the whole model (a recipe's DDP): the figures are one rank's
    # PYTORCH_CUDA_ALLOC_CONF for the caching-allocator model (CUDA targets); None: no model, the tensor peak plus
    # `reserve_bytes` decides (the --reserve override, CPU targets, and compare's own predictions)
    alloc_conf: str | None = None
    memory_snapshot: str | None = None  # write the simulated allocator's snapshot (memory_viz's format) here
    # Time: a hardware-catalog GPU name, or "local" (measured op times on this machine's device); None: no time
    gpu: str | None = None
    gpu_spec: str | None = None  # a TOML file adding or overriding catalog entries
    network: str | None = None  # between nodes; None: the catalog's default (hardware.catalog.DEFAULT_NETWORK)
    gpus_per_node: int | None = None  # None: 8, or the GPU count when smaller
    # --calibration: a compare report measured on the card; its outside-allocator figure is reserve_bytes then
    calibration: str | None = None
    # trace the whole model even where shallow copies of its first layers write its trace (layer-periodic tracing)
    full_model: bool = False


# The optimizers of the study's inclusion relations, and the two whose memory optprof is about.
DEFAULT_TUNE_OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "adam", "nadam", "adamw", "adam-mini")


@dataclass(frozen=True)
class TuneBudget:
    """What every optimizer gets in `optprof tune`: the same trials, each trained the same way. The defaults keep
    a default run (demo model, byte tokens, 8 optimizers) within 10 minutes on 2 CPU cores."""

    trials: int = 8  # points of each optimizer's search space
    steps: int = 50  # optimizer steps per trial, at a constant learning rate
    micro_batch: int = 8  # sequences per step
    seq_len: int = 64  # tokens per sequence
    eval_sequences: int = 64  # held-out windows the final loss averages over (evenly spaced, the same for all)


@dataclass(frozen=True)
class TuneConfig:
    model: ModelSelection
    optimizers: tuple[str, ...]  # empty: DEFAULT_TUNE_OPTIMIZERS
    budget: TuneBudget = field(default_factory=TuneBudget)
    opt_args: dict[str, Any] = field(default_factory=dict)  # fixed arguments for every optimizer (not tuned)
    seed: int = 0  # weights, batches and the quasi-random points
    noise_seeds: int = 2  # other seeds the best trial of each optimizer runs again with: the noise margin
    jobs: int = 1  # trials at once, each in a forked single-threaded worker (the figures do not depend on it)
    space_file: str | None = None  # --space: TOML overriding the default search spaces
    data: str | None = None  # --data: the user's text; None: the Python standard library's source


MAX_JOBS = 4  # measuring on meta or fake tensors is Python-bound; more workers than cores only adds memory


def default_jobs() -> int:
    """Optimizers measured at once by default: one per core, at most MAX_JOBS."""
    import os

    return max(1, min(os.cpu_count() or 1, MAX_JOBS))


def mesh_shape(strategy: Strategy, world_size: int, shard_size: int | None) -> tuple[int, ...]:
    """The device mesh FSDP2 shards over: (ranks,), or for hsdp (replicas, ranks per shard group)."""
    if strategy != Strategy.HSDP:
        return (world_size,)
    shard = shard_size or world_size
    return (world_size // shard, shard)


OFFLOAD_ON_CPU = ("--offload-optimizer moves optimizer state from the GPU to host memory; on CPU ranks both are "
                  "the same memory, so there is nothing it could show: run it on CUDA")


def check_offload(offload: bool, device: DeviceKind, gpus: int, strategy: Strategy) -> None:
    """--offload-optimizer goes through FSDP2's CPUOffloadPolicy: several ranks under a sharded strategy, on CUDA."""
    if not offload:
        return
    if gpus < 2 or strategy not in SHARDED_STRATEGIES:
        raise UsageError("--offload-optimizer works through FSDP2's CPUOffloadPolicy: use --gpus N (N > 1) with "
                         f"--strategy {', '.join(SHARDED_STRATEGIES)}")
    if device != DeviceKind.CUDA:
        raise UsageError(OFFLOAD_ON_CPU)


def resolve_shard_size(strategy: Strategy, world_size: int, requested: int | None,
                       ranks_per_node: int | None) -> int | None:
    """hsdp's shard group: as asked, else the ranks of one node (torchrun's LOCAL_WORLD_SIZE), else all ranks."""
    if strategy != Strategy.HSDP:
        if requested is not None:
            raise UsageError(f"--shard-size applies to --strategy hsdp, not {strategy}")
        return None
    shard = requested or ranks_per_node or world_size
    if world_size % shard:
        raise UsageError(f"--shard-size {shard} does not divide the {world_size} ranks into equal shard groups")
    return shard


def resolve_device(requested: DeviceKind | None) -> DeviceKind:
    """The device to train on: cuda when available unless asked; asking for cuda without it is a UsageError."""
    import torch

    if requested is None:
        return DeviceKind.CUDA if torch.cuda.is_available() else DeviceKind.CPU
    if requested == DeviceKind.CUDA and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UsageError(f"--device cuda: no CUDA device is available (torch {torch.__version__}, {build})")
    return requested


def whole_number(text: str, flag: str, alternative: str = "") -> int:
    """A count of at least 1 given as text (a flag that also takes a word, such as --micro-batch auto)."""
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{flag}: expected a whole number of at least 1{alternative}; got '{text}'")
    return int(text)


def resolve_micro_batch(text: str | None, device: DeviceKind, limited: bool) -> int | None:
    """compare's --micro-batch: a fixed size, or None for the search ('auto': the default on cuda or with a
    limit)."""
    if text == "auto" or (text is None and (device == DeviceKind.CUDA or limited)):
        return None
    return TrainingSettings.micro_batch if text is None else whole_number(text, "--micro-batch", ", or 'auto'")


def default_reserve(device: DeviceKind) -> int:
    """Bytes per device that tensors do not show: on a CPU the tensor peak decides alone."""
    return DEFAULT_CUDA_RESERVE_BYTES if device == DeviceKind.CUDA else 0


def resolve_seq_len(requested: int | None, context_length: int | None, device: DeviceKind) -> int:
    """The sequence length a run uses: the request (checked against the model), else the capped default."""
    if requested is None:
        return min(context_length or SEQ_LEN_FALLBACK, SEQ_LEN_CAP[device])
    if context_length and requested > context_length:
        raise UsageError(f"--seq-len {requested} exceeds the model's context length ({context_length} positions)")
    return requested


def check_training(training: TrainingSettings, dtype: Dtype) -> None:
    if training.amp == Amp.FP16 and dtype != Dtype.FLOAT32:
        raise UsageError(f"--amp fp16 scales the loss, and its scaler cannot unscale {dtype} gradients: use "
                         "float32 parameters (drop --dtype) or --amp bf16")
    if training.warmup < 2:
        raise UsageError("--warmup must be at least 2: Adam-style state is allocated in the first step")
    if training.checkpoint_every < 1:
        raise UsageError("selective-layer:K checkpoints every K-th block: K must be at least 1")
    if training.loss_chunks is not None and training.loss_chunks < 1:
        raise UsageError("--loss chunked:N: N must be at least 1")


def parameter_dtype(selection: ModelSelection, training: TrainingSettings) -> Dtype:
    """The dtype parameters (and so gradients and state) are built in; autocast and FSDP2's policy only change
    the dtype the step computes in."""
    return selection.dtype


def checkpointing_text(training: TrainingSettings) -> str:
    """--activation-checkpointing as the user writes it: none, full, selective-op, selective-layer:K."""
    if training.checkpointing == Checkpointing.SELECTIVE_LAYER:
        return f"{training.checkpointing}:{training.checkpoint_every}"
    return str(training.checkpointing)


def loss_text(training: TrainingSettings) -> str:
    return "default" if training.loss_chunks is None else f"chunked:{training.loss_chunks}"


def mp_policy_text(training: TrainingSettings) -> str | None:
    if training.mp_param is None:
        return None
    return f"{training.mp_param},{training.mp_reduce or training.mp_param}"


@dataclass(frozen=True)
class StepPrecision:
    """The dtype of each thing a step holds or computes, as the settings make it (a derived description)."""

    parameters: Precision  # as stored (FSDP2: the shards)
    gathered: Precision  # what forward computes with: FSDP2's all-gathered copy, or the parameters
    compute: Precision  # matmuls' dtype: autocast's where it runs, else the gathered parameters'
    gradients: Precision  # as kept for the optimizer (FSDP2 casts reduced gradients back to the shards' dtype)
    reduction: Precision | None  # the gradient all-reduce / reduce-scatter; None: one device, no reduction
    state: Precision  # optimizer state follows the parameters it updates

    def text(self) -> str:
        reduce = f", reduce {self.reduction}" if self.reduction is not None else ""
        return (f"parameters {self.parameters}, gathered {self.gathered}, compute {self.compute}, gradients "
                f"{self.gradients}{reduce}, state {self.state}")


def step_precision(dtype: Dtype, training: TrainingSettings, reduces: bool) -> StepPrecision:
    """`reduces`: gradients are reduced across ranks (several ranks, or FSDP2 over one)."""
    stored = PRECISION_OF_DTYPE[dtype]
    gathered = training.mp_param or stored
    compute = Precision(training.amp) if training.amp is not None else gathered
    reduction = (training.mp_reduce or gathered) if reduces else None
    return StepPrecision(stored, gathered, compute, stored, reduction, stored)


def implementation_text(impl: UpdateImpl | None, device: DeviceKind, opt_args: dict[str, Any]) -> str:
    """'torch optimizers' update foreach (torch's default on CUDA)', for the step line."""
    given = {key: opt_args[key] for key in CHOICE_ARGS if key in opt_args}
    if given:
        fused, foreach = bool(given.get("fused")), given.get("foreach")
        chosen = "fused" if fused else "foreach" if foreach else "for-loop"
        why = ", ".join(f"--opt-arg {key}={value}" for key, value in given.items())
    elif impl is not None:
        chosen, why = str(impl), "the recipe's"
    else:
        chosen = "foreach" if device == DeviceKind.CUDA else "for-loop"
        why = f"torch's default on {device.upper()}"
    return f"torch optimizers' update {chosen} ({why})"


def step_record(dtype: Dtype, training: TrainingSettings, reduces: bool, sharded: bool,
                opt_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The step as a report's config records it: each thing's precision, and one line for the model line.
    `reduces`: gradients are reduced across ranks; `sharded`: FSDP2 runs (its units are named)."""
    precision = step_precision(dtype, training, reduces)
    parts = [f"recipe {training.recipe}"] if training.recipe else []
    parts += [precision.text(), f"autocast {training.amp or 'off'}",
              f"activation checkpointing {checkpointing_text(training)}",
              "loss " + ("default (full logits, upcast to fp32)" if training.loss_chunks is None
                         else f"chunked:{training.loss_chunks} (head and fp32 upcast per chunk of tokens)")]
    if sharded:
        parts.append(f"FSDP2 units {training.fsdp_units}")
    update = implementation_text(training.update_impl, training.device, opt_args or {})
    parts.append(update)
    return {"update": update, "precision": {key: (str(value) if value is not None else None)
                          for key, value in precision.__dict__.items()},
            "mp_policy": mp_policy_text(training), "activation_checkpointing": checkpointing_text(training),
            "loss": loss_text(training), "step": "; ".join(parts)}


def _precision(text: str, flag: str) -> Precision:
    try:
        return Precision(text.strip().lower())
    except ValueError:
        raise UsageError(f"{flag}: unknown precision '{text}': choose fp32, bf16 or fp16") from None


def parse_mp_policy(text: str) -> tuple[Precision, Precision | None]:
    """--mp-policy PARAM[,REDUCE]."""
    parts = text.split(",")
    if len(parts) > 2 or not parts[0]:
        raise UsageError(f"--mp-policy: expected PARAM[,REDUCE], e.g. bf16,fp32; got '{text}'")
    return _precision(parts[0], "--mp-policy"), (_precision(parts[1], "--mp-policy") if len(parts) == 2 else None)


def parse_checkpointing(text: str) -> tuple[Checkpointing, int]:
    """--activation-checkpointing none | full | selective-op | selective-layer:K."""
    mode, _, every = text.strip().lower().partition(":")
    try:
        choice = Checkpointing(mode)
    except ValueError:
        raise UsageError(f"--activation-checkpointing: unknown mode '{text}': choose none, full, selective-op or "
                         "selective-layer:K") from None
    if choice == Checkpointing.SELECTIVE_LAYER:
        return choice, whole_number(every, "--activation-checkpointing selective-layer:K")
    if every:
        raise UsageError(f"--activation-checkpointing {mode} takes no ':K' (only selective-layer:K does)")
    return choice, 1


def parse_loss(text: str) -> int | None:
    """--loss default | chunked:N: the number of chunks, None for the default loss."""
    kind, _, chunks = text.strip().lower().partition(":")
    if kind == "default" and not chunks:
        return None
    if kind == "chunked":
        return whole_number(chunks, "--loss chunked:N")
    raise UsageError(f"--loss: expected default or chunked:N; got '{text}'")


def cache_dir() -> Path:
    """Where optprof caches (support decisions, measured op times): $OPTPROF_CACHE_DIR, else
    $XDG_CACHE_HOME/optprof, else ~/.cache/optprof."""
    if os.environ.get("OPTPROF_CACHE_DIR"):
        return Path(os.environ["OPTPROF_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optprof"
