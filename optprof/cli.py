"""Command line: flags -> config dataclasses -> a command -> a report -> rendered (the only place that exits).

torch and transformers are imported inside the commands so that `optprof --help` stays fast.
"""

from __future__ import annotations

import sys
import traceback
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_args

import typer

from optprof import __version__, config
from optprof.errors import UsageError
from optprof.quiet import quiet_libraries
from optprof.units import Unit, parse_bytes

if TYPE_CHECKING:
    from optprof.baseline import Command
    from optprof.config import ModelSelection
    from optprof.results import ModelReport, Report

DEFAULT_MODEL = "demo"  # bundled, about 7M parameters: every command finishes fast on a laptop CPU

app = typer.Typer(
    name="optprof",
    help="Memory and throughput profiler for LLM training optimizers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _choices(name: str, literal: Any) -> type[StrEnum]:
    """A typer choice enum whose members are the values of a config Literal (one list of what is allowed)."""
    return StrEnum(name, {value: value for value in get_args(literal)})  # type: ignore[return-value]


Dtype = _choices("Dtype", config.Dtype)
Amp = _choices("Amp", config.Amp)
DeviceKind = _choices("DeviceKind", config.DeviceKind)
Strategy = _choices("Strategy", config.Strategy)  # compare: real ranks
ShardedStrategy = StrEnum("ShardedStrategy", {s: s for s in config.SHARDED_STRATEGIES})  # fake-tensor commands
Units = _choices("Units", Unit)
OutputFormat = StrEnum("OutputFormat", {"table": "table", "json": "json", "csv": "csv", "html": "html"})

_debug = False  # set by --debug: show tracebacks instead of one-line errors


def _version(value: bool) -> None:
    if value:
        typer.echo(f"optprof {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks and library warnings.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    global _debug
    _debug = debug
    if not debug:
        quiet_libraries()


# Options that several commands share, declared once.
ModelArg = Annotated[str, typer.Argument(
    help="Bundled config name or alias (see `optprof models`), a local folder with a config.json, "
    "or a Hugging Face hub id (its config only; never weights).", show_default=True)]
OptimizerOpt = Annotated[list[str] | None, typer.Option(
    "--optimizer", "-o", help="Optimizer name (repeatable or comma-separated; 'all' for every one, see `optprof "
    "optimizers`), or package.module:ClassName. Default: adamw, adam-mini, adam-mini-paper, adafactor, sgd, momentum.")]
OptArgOpt = Annotated[list[str] | None, typer.Option(
    "--opt-arg", help="key=value passed to every selected optimizer (repeatable), e.g. rank=256.")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Parameter dtype (gradients and state follow it).")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a hub config's own modelling code to run.")]
FormatOpt = Annotated[OutputFormat, typer.Option(
    "--format", "-f", help="table (terminal), json, csv, or html (one self-contained file: tables, figures, "
    "environment), to stdout or --output.")]
OutputOpt = Annotated[Path | None, typer.Option(
    "--output", help="Write json or csv here (format from --format, else the file suffix).")]
PlotOpt = Annotated[Path | None, typer.Option(
    "--plot", help="Also draw the report's figures to this PNG (memory by category, micro-batch, state, "
    "predicted against measured: those that fit).")]
SaveProfileOpt = Annotated[Path | None, typer.Option(
    "--save-profile", help="Write a profile (TOML) that guards these results, for `optprof check`.")]
UnitsOpt = Annotated[Units | None, typer.Option(
    "--units", help="Byte units in tables: gb, gib, mb or mib (default: gb, or mb for small models).")]
AmpOpt = Annotated[Amp | None, typer.Option(
    "--amp", help="Mixed precision: float32 master weights, forward and backward under autocast.")]
SeqLenOpt = Annotated[int | None, typer.Option(
    "--seq-len", min=1, help="Tokens per sequence (default: the model's context length, at most 2048 on cuda and "
    "512 on cpu).")]
GradAccumOpt = Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches per optimizer step.")]
CheckpointingOpt = Annotated[bool, typer.Option(
    "--gradient-checkpointing", help="Recompute activations in backward to save memory.")]
MaxMicroBatchOpt = Annotated[int, typer.Option(
    "--max-micro-batch", min=1, help="The micro-batch search never tries more.")]
ShardedGpusOpt = Annotated[int, typer.Option(
    "--gpus", min=1, help="Per-rank figures when sharded over this many ranks (FSDP2 on a fake process group, in "
    "this one process).")]
ShardedStrategyOpt = Annotated[ShardedStrategy, typer.Option(
    "--strategy", help="With --gpus > 1: fsdp (FSDP2, ZeRO-3: one unit per transformer block, then the root), "
    "zero2 (FSDP2 keeping parameters gathered after forward: state and gradients sharded) or hsdp (FSDP2 sharded "
    "inside each shard group, replicated across them).")]
ShardSizeOpt = Annotated[int | None, typer.Option(
    "--shard-size", min=1, help="hsdp: ranks per shard group, usually one node's (default: torchrun's "
    "LOCAL_WORLD_SIZE, else every rank).")]

JobsOpt = Annotated[int | None, typer.Option(
    "--jobs", "-j", min=1, help="Optimizers measured at once, in forked workers (default: CPU cores, at most 4).")]
FullModelOpt = Annotated[bool, typer.Option(
    "--full-model", help="Step the whole model, even where copies of its first 1, 2 and 3 layers give the same "
    "figures (each checked affine in the layer count, then extrapolated; faster for deep models).")]


LoraOpt = Annotated[str | None, typer.Option(
    "--lora", help="Train LoRA adapters only (peft), e.g. r=16 or r=16,alpha=32,dropout=0.05,targets=q_proj+v_proj "
    "(unset keys: peft's defaults for the architecture).")]
QloraOpt = Annotated[str | None, typer.Option(
    "--qlora", help="As --lora, with the base's linear layers in 4-bit NF4 (bitsandbytes, double quantization): "
    "compare runs it on CPU or CUDA; state-size gives its exact state; predict lowers its peaks by the NF4 "
    "saving, measured per weight shape (fake tensors cannot hold 4-bit weights).")]
AttentionOpt = Annotated[str | None, typer.Option(
    "--attention", help="transformers' attention implementation, e.g. eager (its activations hold the attention "
    "matrix; needed by optimizers that differentiate the gradients, such as sophiah) or sdpa (the default).")]
FreezeOpt = Annotated[list[str] | None, typer.Option(
    "--freeze", help="Freeze the parameters whose names match this glob (repeatable), e.g. '*embed_tokens*': no "
    "gradient, no optimizer state.")]


def _selection(model: str, dtype: StrEnum, revision: str | None, trust_remote_code: bool, lora: str | None = None,
               freeze: list[str] | None = None, qlora: str | None = None, attention: str | None = None,
               ) -> ModelSelection:
    from optprof.setups import parse_lora

    if lora is not None and qlora is not None:
        raise UsageError("--lora and --qlora: give one (--qlora is LoRA on a 4-bit base)")
    spec = lora if qlora is None else qlora
    setup = config.TrainingSetup(parse_lora(spec) if spec is not None else None, tuple(freeze or ()), qlora is not None,
                                 attention)
    return config.ModelSelection(model, dtype.value, revision, trust_remote_code, setup)  # type: ignore[arg-type]


def _one_device(gpus: int, save_profile: Path | None) -> None:
    if save_profile is not None and gpus > 1:
        raise UsageError("--save-profile: profiles describe one device for now; drop --gpus")


@app.command("state-size")
def state_size(
    model: ModelArg = DEFAULT_MODEL, optimizer: OptimizerOpt = None, opt_arg: OptArgOpt = None,
    dtype: DtypeOpt = Dtype.float32, revision: RevisionOpt = None, trust_remote_code: TrustOpt = False,
    output_format: FormatOpt = OutputFormat.table, output: OutputOpt = None, units: UnitsOpt = None,
    plot: PlotOpt = None, jobs: JobsOpt = None,
    save_profile: SaveProfileOpt = None, gpus: ShardedGpusOpt = 1, strategy: ShardedStrategyOpt = ShardedStrategy.fsdp,
    shard_size: ShardSizeOpt = None, full_model: FullModelOpt = False, lora: LoraOpt = None, qlora: QloraOpt = None,
    freeze: FreezeOpt = None, attention: AttentionOpt = None,
) -> None:
    """Exact optimizer-state bytes per optimizer, measured on the real optimizer over a meta-device model.

    No GPU and no weights needed: the model is built from its config on the meta device, every parameter
    gets a meta gradient, each optimizer takes one real step, and everything it keeps is added up.
    Exit code 1 if an optimizer failed, 2 on bad input.
    """
    from optprof import report
    from optprof.optimizers.registry import parse_opt_args
    from optprof.state_size import run_state_size

    run_config = config.StateSizeConfig(
        _selection(model, dtype, revision, trust_remote_code, lora, freeze, qlora, attention), tuple(optimizer or ()),
        parse_opt_args(opt_arg or []),
        jobs=jobs or config.default_jobs(), gpus=gpus, strategy=strategy.value,  # type: ignore[arg-type]
        shard_size=config.resolve_shard_size(strategy.value, gpus, shard_size, None),  # type: ignore[arg-type]
        full_model=full_model)
    _one_device(gpus, save_profile)
    file_format = _file_format(output_format, output)
    with report.console(stderr=True).status(f"measuring optimizer state for {model} ...") as status:
        result = run_state_size(run_config, on_row=lambda row: status.update(f"measured {row.optimizer}"))
    _finish(result, output_format, output, file_format, units, save_profile, "state-size", plot)


DeviceOpt = Annotated[DeviceKind | None, typer.Option(
    "--device", help="Where to train (default: cuda when available, else cpu).")]
MicroBatchOpt = Annotated[str | None, typer.Option(
    "--micro-batch", help="Sequences per forward/backward, or 'auto': the largest that fits, per optimizer (default: "
    "auto on cuda or with --memory-limit, else 1).")]
MemoryLimitOpt = Annotated[str | None, typer.Option(
    "--memory-limit", help="Memory a step may use, e.g. 24GiB or 500MB (default on cuda: the card's). On cuda the "
    "allocator is capped there, emulating a smaller card.")]
SearchMarginOpt = Annotated[float, typer.Option(
    "--search-margin", min=0.0, max=0.9, help="Fraction of the limit to leave free when choosing the size to measure.")]
GradClipOpt = Annotated[float | None, typer.Option(
    "--grad-clip", min=0.0, help="Clip the gradient norm to this (costs time too).")]
StepsOpt = Annotated[int, typer.Option("--steps", min=1, help="Timed optimizer steps per optimizer.")]
WarmupOpt = Annotated[int, typer.Option(
    "--warmup", help="Untimed steps first (at least 2: lazy state appears in the first).")]
PeakTflopsOpt = Annotated[float | None, typer.Option(
    "--peak-tflops", min=0.0, help="Device peak TFLOP/s for MFU, when optprof does not know it.")]
BreakdownOpt = Annotated[bool, typer.Option(
    "--breakdown/--no-breakdown", help="One extra untimed step under torch's MemTracker for the tensor-level peak and "
    "its breakdown.")]
TrialTimeoutOpt = Annotated[float, typer.Option(
    "--trial-timeout", min=1.0, help="Seconds per optimizer trial, start-up included.")]
GpusOpt = Annotated[int | None, typer.Option(
    "--gpus", min=1, help="Ranks per trial (torch.distributed; CPU processes on gloo only with --device cpu). "
    "Under torchrun: the group's size.")]
StrategyOpt = Annotated[Strategy, typer.Option(
    "--strategy", help="With several ranks: ddp (replicate), zero1 (DDP, optimizer state sharded by "
    "ZeroRedundancyOptimizer), zero2 (FSDP2 keeping parameters gathered after forward: state and gradients "
    "sharded), fsdp (FSDP2, ZeRO-3: everything sharded) or hsdp (FSDP2 on a 2-D mesh: sharded inside each shard "
    "group, replicated across groups).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for weights and tokens (the same for every optimizer).")]
PredictOpt = Annotated[bool, typer.Option("--predict/--no-predict", help="Also predict each row's peak on fake "
                                          "tensors (in this process) and report its error against the measured one.")]
PreflightOpt = Annotated[bool, typer.Option(
    "--preflight/--no-preflight", help="Before launching a trial, decide on fake tensors (in this process) whether the "
    "optimizer runs under the strategy (else `unsupported`) and whether the step can fit (over 110% of the memory "
    "available: `does not fit`).")]


@app.command("compare")
def compare(
    model: ModelArg = DEFAULT_MODEL, optimizer: OptimizerOpt = None, opt_arg: OptArgOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = Dtype.float32, amp: AmpOpt = None, seq_len: SeqLenOpt = None,
    micro_batch: MicroBatchOpt = None, memory_limit: MemoryLimitOpt = None, max_micro_batch: MaxMicroBatchOpt = 256,
    search_margin: SearchMarginOpt = 0.0, grad_accum: GradAccumOpt = 1, grad_clip: GradClipOpt = None,
    gradient_checkpointing: CheckpointingOpt = False, steps: StepsOpt = 10, warmup: WarmupOpt = 2,
    peak_tflops: PeakTflopsOpt = None, breakdown: BreakdownOpt = True, trial_timeout: TrialTimeoutOpt = 1800.0,
    save_profile: SaveProfileOpt = None, gpus: GpusOpt = None, strategy: StrategyOpt = Strategy.fsdp,
    shard_size: ShardSizeOpt = None, seed: SeedOpt = 0, predict: PredictOpt = True, preflight: PreflightOpt = True,
    memory_snapshot: Annotated[Path | None, typer.Option(
        "--memory-snapshot", help="CUDA only: record the allocator's history over each optimizer's tracked step "
        "and dump it into this folder, one file per optimizer (and rank), for PyTorch's memory visualiser.")] = None,
    offload_optimizer: Annotated[bool, typer.Option(
        "--offload-optimizer", help="FSDP2's CPUOffloadPolicy (CUDA, --gpus N with a sharded strategy): sharded "
        "parameters, gradients and optimizer state in host memory, the step on the CPU.")] = False,
    revision: RevisionOpt = None, trust_remote_code: TrustOpt = False, lora: LoraOpt = None, qlora: QloraOpt = None,
    freeze: FreezeOpt = None, attention: AttentionOpt = None,
    output_format: FormatOpt = OutputFormat.table, output: OutputOpt = None, units: UnitsOpt = None,
    plot: PlotOpt = None,
) -> None:
    """Train MODEL for a few real steps under each optimizer and measure memory, time and throughput.

    Each optimizer runs in a fresh process on synthetic tokens: warm-up steps, then timed steps (forward,
    backward and optimizer step timed apart) with memory sampled in the background, then one untimed step
    under torch's MemTracker for the tensor-level peak. With --micro-batch auto, short probe trials first
    find the largest micro-batch that fits each optimizer; it is then measured there, and at the largest
    size every optimizer fits. Exit code 1 if a trial failed (out of memory, or not fitting at
    micro-batch 1, is a result, not a failure), 2 on bad input.
    """
    from optprof import report
    from optprof.compare import run_compare
    from optprof.dist import ranks_per_node, resolve_ranks, torchrun_group
    from optprof.optimizers.registry import parse_opt_args

    kind = config.resolve_device(device.value if device else None)  # type: ignore[arg-type]
    world, joined = resolve_ranks(kind, gpus, device_given=device is not None)
    config.check_offload(offload_optimizer, kind, world, strategy.value)  # type: ignore[arg-type]
    if memory_snapshot is not None and (kind != "cuda" or not breakdown):
        raise UsageError("--memory-snapshot records CUDA's allocator over the tracked step: it needs --device cuda "
                         "and --breakdown" + ("; there is no CUDA allocator on --device cpu" if kind != "cuda" else ""))
    if qlora is not None and world > 1:
        raise UsageError("--qlora runs on one device for now (FSDP over 4-bit parameters is not set up); drop --gpus")
    limit = None if memory_limit is None else parse_bytes(memory_limit, "--memory-limit")
    fixed = config.resolve_micro_batch(micro_batch, kind, limit is not None)
    if save_profile is not None and fixed is None:
        raise UsageError("--save-profile needs a fixed --micro-batch (a profile names one)")
    training = config.TrainingSettings(
        device=kind, amp=amp.value if amp else None, seq_len=seq_len, micro_batch=fixed or 1,  # type: ignore[arg-type]
        grad_accum=grad_accum, grad_clip=grad_clip, gradient_checkpointing=gradient_checkpointing, steps=steps,
        warmup=warmup, breakdown=breakdown, peak_tflops=peak_tflops, memory_limit_bytes=limit, seed=seed)
    run_config = config.CompareConfig(
        _selection(model, dtype, revision, trust_remote_code, lora, freeze, qlora, attention),
        tuple(optimizer or ()), training,
        parse_opt_args(opt_arg or []), search=config.SearchSettings(max_micro_batch, search_margin) if fixed is None
        else None, gpus=world, strategy=strategy.value, torchrun=joined, trial_timeout_s=trial_timeout,  # type: ignore[arg-type]
        predict=predict, preflight=preflight, offload_optimizer=offload_optimizer,
        memory_snapshot_dir=None if memory_snapshot is None else str(memory_snapshot),
        shard_size=config.resolve_shard_size(
            strategy.value, world, shard_size, ranks_per_node() if joined else None))  # type: ignore[arg-type]
    file_format = _file_format(output_format, output)
    err = report.console(stderr=True)
    with torchrun_group(kind, joined) as reporter, err.status(f"comparing optimizers on {model} ...") as status:
        result = run_compare(run_config, on_progress=lambda name, text: status.update(f"{name}: {text}"),
                             on_row=lambda row: err.print(report.trial_line(row)), quiet=not _debug)
    if reporter:  # under torchrun, rank 0 writes the report
        _finish(result, output_format, output, file_format, units, save_profile, "compare", plot)


@app.command("predict")
def predict(
    model: ModelArg = DEFAULT_MODEL, optimizer: OptimizerOpt = None, opt_arg: OptArgOpt = None,
    gpu_memory: Annotated[str | None, typer.Option(
        "--gpu-memory", help="Memory per device, e.g. 80GiB: also predict the largest micro-batch that fits it.")
    ] = None,
    reserve: Annotated[str | None, typer.Option(
        "--reserve", help="Memory per device that tensors do not show: CUDA context, cuBLAS/cuDNN workspaces, "
        "allocator slack (default 2GiB for cuda, 0 for cpu).")] = None,
    gpus: ShardedGpusOpt = 1, strategy: ShardedStrategyOpt = ShardedStrategy.fsdp, shard_size: ShardSizeOpt = None,
    device: Annotated[DeviceKind, typer.Option(
        "--device", help="The device to predict for (nothing runs on it).")] = DeviceKind.cuda,
    dtype: DtypeOpt = Dtype.float32, amp: AmpOpt = None, seq_len: SeqLenOpt = None,
    micro_batch: Annotated[int, typer.Option("--micro-batch", min=1, help="Sequences per forward/backward.")] = 1,
    grad_accum: GradAccumOpt = 1, gradient_checkpointing: CheckpointingOpt = False,
    max_micro_batch: MaxMicroBatchOpt = 256, revision: RevisionOpt = None, trust_remote_code: TrustOpt = False,
    output_format: FormatOpt = OutputFormat.table, output: OutputOpt = None, units: UnitsOpt = None,
    plot: PlotOpt = None, save_profile: SaveProfileOpt = None, jobs: JobsOpt = None, lora: LoraOpt = None,
    qlora: QloraOpt = None, freeze: FreezeOpt = None, attention: AttentionOpt = None,
) -> None:
    """Predict peak memory per device (and the largest micro-batch) without a GPU, from fake tensors.

    The training step (forward, backward, the real optimizer's step) runs on fake tensors, which have
    shapes but no memory, under torch's MemTracker; with --gpus N, under FSDP2 on a fake process group.
    Every figure is labelled predicted, and the output lists what fake CPU tensors cannot see.
    Exit code 1 if an optimizer failed, 2 on bad input.
    """
    from optprof import report
    from optprof.optimizers.registry import parse_opt_args
    from optprof.predict import run_predict

    training = config.TrainingSettings(
        device=device.value, amp=amp.value if amp else None, seq_len=seq_len, micro_batch=micro_batch,  # type: ignore[arg-type]
        grad_accum=grad_accum, gradient_checkpointing=gradient_checkpointing)
    run_config = config.PredictConfig(
        _selection(model, dtype, revision, trust_remote_code, lora, freeze, qlora, attention),
        tuple(optimizer or ()), training,
        parse_opt_args(opt_arg or []), max_micro_batch=max_micro_batch, gpus=gpus, strategy=strategy.value,  # type: ignore[arg-type]
        shard_size=config.resolve_shard_size(strategy.value, gpus, shard_size, None),  # type: ignore[arg-type]
        jobs=jobs or config.default_jobs(),
        gpu_memory_bytes=None if gpu_memory is None else parse_bytes(gpu_memory, "--gpu-memory"),
        reserve_bytes=config.default_reserve(training.device) if reserve is None else parse_bytes(
            reserve, "--reserve", allow_zero=True))
    if run_config.gpu_memory_bytes is not None and run_config.gpu_memory_bytes <= run_config.reserve_bytes:
        raise UsageError("--gpu-memory must be larger than --reserve")
    _one_device(gpus, save_profile)
    file_format = _file_format(output_format, output)
    err = report.console(stderr=True)
    with err.status(f"predicting on fake tensors for {model} ...") as status:
        result = run_predict(run_config, on_progress=lambda name, text: status.update(f"{name}: {text}"),
                             on_row=lambda row: err.print(report.prediction_line(row)))
    _finish(result, output_format, output, file_format, units, save_profile, "predict", plot)


@app.command("tune")
def tune(
    model: ModelArg = DEFAULT_MODEL,
    optimizer: Annotated[list[str] | None, typer.Option(
        "--optimizer", "-o", help="Optimizers to tune (repeatable or comma-separated). Default: sgd, momentum, "
        "nesterov, rmsprop, adam, nadam, adamw, adam-mini (the study's inclusion chains, and Adam-mini).")] = None,
    trials: Annotated[int, typer.Option("--trials", min=1, help="Points of each optimizer's search space, "
                                        "the same number for every optimizer.")] = 8,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps per trial.")] = 50,
    micro_batch: Annotated[int, typer.Option("--micro-batch", min=1, help="Sequences per step.")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="Tokens per sequence.")] = 64,
    eval_sequences: Annotated[int, typer.Option(
        "--eval-sequences", min=1, help="Held-out windows the final loss averages over.")] = 64,
    noise_seeds: Annotated[int, typer.Option(
        "--noise-seeds", min=0, help="Seeds the best point of each optimizer is trained again with: the noise "
        "margin of the inclusion checks (0: none).")] = 2,
    space: Annotated[Path | None, typer.Option(
        "--space", help="TOML file of search spaces: [adam] lr = [1e-4, 1e-2], beta2 = 0.999, eps = {low = 1e-8, "
        "high = 1e-6, scale = \"log\"} (scales: log, log1m (1 - x on a log scale), linear).")] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", help="Text to train on: a folder of files, a text file, or a JSONL file with a `text` field "
        "(default: the Python standard library's source). Split by document: every 10th held out.")] = None,
    opt_arg: Annotated[list[str] | None, typer.Option(
        "--opt-arg", help="key=value passed to every optimizer, not tuned (repeatable).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Weights, batches and the quasi-random points.")] = 0,
    jobs: Annotated[int | None, typer.Option(
        "--jobs", "-j", min=1, help="Trials at once, each in a single-threaded worker (default: CPU cores, at most "
        "4); the losses do not depend on it.")] = None,
    revision: RevisionOpt = None, trust_remote_code: TrustOpt = False,
    output_format: FormatOpt = OutputFormat.table, output: OutputOpt = None, units: UnitsOpt = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Also draw each optimizer's best training curve and its best loss against trials spent "
        "to this PNG.")] = None,
) -> None:
    """Quality at equal tuning budget (the optimizer study's protocol): tune each optimizer on real text.

    Each optimizer gets the same number of trials at quasi-random points of its own search space, each trained
    for the same steps on CPU from the same weights, then scored by its loss on held-out text. The best point
    is trained again with other seeds to measure the noise; the study's inclusion relations (SGD ⊆ momentum ⊆
    RMSProp / Adam, SGD ⊆ Nesterov ⊆ NAdam) are checked within it. Exit code 1 if a trial failed, 2 on bad
    input.
    """
    from optprof import report
    from optprof.optimizers.registry import parse_opt_args
    from optprof.tune import run_tune

    run_config = config.TuneConfig(
        _selection(model, Dtype.float32, revision, trust_remote_code), tuple(optimizer or ()),
        config.TuneBudget(trials, steps, micro_batch, seq_len, eval_sequences), parse_opt_args(opt_arg or []),
        seed=seed, noise_seeds=noise_seeds, jobs=jobs or config.default_jobs(),
        space_file=None if space is None else str(space), data=None if data is None else str(data))
    file_format = _file_format(output_format, output)
    with report.console(stderr=True).status(f"tuning optimizers on {model} ...") as status:
        result = run_tune(run_config, on_trial=lambda name, trial, done, total: status.update(
            f"{done}/{total} trials: {name} point {trial.index} seed {trial.seed}: {trial.status}"))
    _finish(result, output_format, output, file_format, units, plot=plot)


@app.command("check")
def check(
    paths: Annotated[list[Path] | None, typer.Argument(
        help="Profile files or folders (searched for *.toml with a [profile] table). Default: the profiles optprof "
        "ships.")] = None,
    update: Annotated[bool, typer.Option(
        "--update", help="Rewrite the expected values from this run (comments and tolerances kept).")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on improvements past the tolerance too.")] = False,
    junit: Annotated[Path | None, typer.Option("--junit", help="Also write JUnit XML here (for CI).")] = None,
    output_format: Annotated[OutputFormat, typer.Option(
        "--format", "-f", help="table (terminal) or json.")] = OutputFormat.table,
) -> None:
    """CI regression check: recompute each profile's measures and compare them with the expected values.

    Optimizer-state bytes and predicted peaks run on any machine; measured peak and tokens/s need a GPU and
    are skipped (and said so) without one. Exit code 0 when every measure holds, 1 on a regression, 2 on a
    usage error or an unreadable profile.
    """
    from optprof import report
    from optprof.check import run_check, to_junit
    from optprof.models import profiles_dir

    if output_format.value == "csv":
        raise UsageError("check writes table or json (and --junit XML)")
    with report.console(stderr=True).status("checking profiles ...") as status:
        result = run_check(paths or [profiles_dir()], update=update, strict=strict,
                           on_profile=lambda p: status.update(f"checking {p.path} ({p.model})"))
    if junit is not None:
        _write(junit, to_junit(result), "JUnit XML")
    _finish(result, output_format, None, None, None)


@app.command("optimizers")
def optimizers(
    output_format: FormatOpt = OutputFormat.table, output: OutputOpt = None,
    strategy: Annotated[Strategy | None, typer.Option(
        "--strategy", help="Add a column: whether each optimizer runs under this strategy, decided by one training "
        "step on fake tensors over 2 fake ranks (cached per installed versions).")] = None,
) -> None:
    """List the optimizers optprof can profile: package and version, family, available here or why not."""
    from optprof import report
    from optprof.preflight import optimizers_with_support

    file_format = _file_format(output_format, output)
    with report.console(stderr=True).status("listing optimizers ...") as status:
        result = optimizers_with_support(strategy.value if strategy else None,  # type: ignore[arg-type]
                                         lambda name: status.update(f"{name}: a fake step under {strategy}"))
    _finish(result, output_format, output, file_format, None)


@app.command("models")
def models(output_format: FormatOpt = OutputFormat.table, output: OutputOpt = None) -> None:
    """List the model configs bundled in profiles/models (usable offline, by name or hub alias)."""
    from optprof.results import ModelsReport

    _finish(ModelsReport.bundled(), output_format, output, _file_format(output_format, output), None)


@app.command("report")
def report_(
    files: Annotated[list[Path], typer.Argument(
        help="Reports saved with --format json or --output (state-size, compare, predict, check, optimizers, "
        "models). Several of one kind show side by side, each row labelled by its file.")],
    output_format: FormatOpt = OutputFormat.table, output: OutputOpt = None, units: UnitsOpt = None,
    plot: PlotOpt = None,
) -> None:
    """Re-render saved reports: the table again, or JSON / CSV; several runs of one kind side by side."""
    from optprof import report, results

    runs = [results.read_report(path) for path in files]
    labels = results.run_labels(files)
    described = [(label, run) for label, run in zip(labels, runs, strict=True) if isinstance(run, results.ModelReport)]
    chosen = units.value if units else None

    def shown() -> results.Report:
        """The runs as one report (they must be of one kind; JSON and CSV also take mixed kinds)."""
        return results.combined(runs, labels) if len(runs) > 1 else runs[0]

    if plot is not None:
        _plot(shown(), plot, chosen)
    if output_format.value == "table" and output is None:
        report.console().print(report.render(shown(), chosen, described))
        return
    fmt = _file_format(output_format, output) or output_format.value
    if fmt == "html":
        from optprof.html import html_document

        text = html_document(shown(), chosen, described)
    else:
        text = results.serialise(runs, labels, fmt)
    if output is None:
        typer.echo(text, nl=False)
    else:
        _write(output, text, fmt)


def _file_format(output_format: StrEnum, output: Path | None) -> str | None:
    if output is None:
        return None
    if output_format.value != "table":
        return output_format.value
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in ("json", "csv", "html"):
        raise UsageError(f"cannot tell the format of '{output}': use a .json, .csv or .html name, or --format")
    return suffix


def _write(path: Path, text: str, what: str) -> None:
    from optprof import report

    _save(path, text.encode())
    report.console(stderr=True).print(f"wrote {what} to {path}")


def _finish(result: Report, output_format: StrEnum, output: Path | None, file_format: str | None,
            units: StrEnum | None, save_profile: Path | None = None, command: Command | None = None,
            plot: Path | None = None) -> None:
    """Table to the terminal, data to stdout, or data to --output (the table still shown); the plot; the
    profile; then exit 1 if a row failed."""
    from optprof import report

    if plot is not None:
        _plot(result, plot, units.value if units else None)
    chosen = units.value if units else None
    if output is not None and file_format is not None:
        _write(output, _serialised(result, file_format, chosen), file_format)
    if output_format.value == "table":
        report.console().print(report.render(result, chosen))
    elif output is None:
        typer.echo(_serialised(result, output_format.value, chosen), nl=False)
    if save_profile is not None and command is not None:
        _save_profile(save_profile, result, command)  # type: ignore[arg-type]
    if result.failed:
        raise typer.Exit(1)


def _serialised(result: Report, fmt: str, units: str | None) -> str:
    if fmt == "html":
        from optprof.html import html_document

        return html_document(result, units)
    return result.to_json() if fmt == "json" else result.to_csv()


def _plot(result: Report, path: Path, units: str | None) -> None:
    from optprof import report, results
    from optprof.plots import plot_png

    if not isinstance(result, results.ModelReport):
        raise UsageError("--plot draws state-size, compare, predict and tune reports")
    _save(path, plot_png(result, units))
    report.console(stderr=True).print(f"wrote plot {path}")


def _save(path: Path, data: bytes) -> None:
    """Write `data` to `path`; a path that cannot be written is the user's one-line error."""
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise UsageError(f"cannot write '{path}': {exc.strerror or exc}") from exc


def _save_profile(path: Path, result: ModelReport, command: Command) -> None:
    from optprof import report
    from optprof.baseline import write_profile

    write_profile(path, result, command)
    report.console(stderr=True).print(f"wrote profile {path}: `optprof check {path}` guards it")


def _click_kind(exc: BaseException) -> str | None:
    """'help', 'usage' or 'abort' for click's exceptions; typer may vendor click, so match by class name."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "NoArgsIsHelpError" in names:
        return "help"
    if "ClickException" in names and "UsageError" in names:
        return "usage"
    if "Abort" in names:
        return "abort"
    return None


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes become one line on stderr and exit code 2."""
    try:
        code = app(args=argv, prog_name="optprof", standalone_mode=False)
    except UsageError as exc:
        if _debug:
            traceback.print_exc()
        typer.echo(f"optprof: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("optprof: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        kind = _click_kind(exc)
        if kind == "help":  # bare `optprof`: the help, not an error
            exc.show()  # type: ignore[attr-defined]
            sys.exit(0)
        if kind == "usage":  # a bad flag or value, from click's own parsing
            typer.echo(f"optprof: error: {exc.format_message()}", err=True)  # type: ignore[attr-defined]
            sys.exit(2)
        if kind == "abort":
            typer.echo("optprof: aborted", err=True)
            sys.exit(1)
        if _debug:
            traceback.print_exc()
        else:
            typer.echo(f"optprof: internal error: {type(exc).__name__}: {exc} (run with --debug for details)",
                       err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
