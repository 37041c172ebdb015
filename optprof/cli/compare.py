"""`optprof compare`: its flags -> CompareConfig -> the report (under torchrun, rank 0 writes it)."""

from __future__ import annotations

from optprof.cli.inputs import SESSION, loaded_dtype, model_selection, time_settings
from optprof.cli.options import (
    DEFAULT_MODEL,
    ActivationCheckpointingOpt,
    AmpOpt,
    AttentionOpt,
    AutoDeviceOpt,
    BreakdownOpt,
    CheckpointingOpt,
    FormatOpt,
    FreezeOpt,
    GpuOpt,
    GpusOpt,
    GpuSpecOpt,
    GradAccumOpt,
    GradClipOpt,
    LoraOpt,
    LossOpt,
    MaxMicroBatchOpt,
    MemoryLimitOpt,
    MemorySnapshotOpt,
    MicroBatchOpt,
    ModelArg,
    MpPolicyOpt,
    OffloadOpt,
    OptArgOpt,
    OptimizerOpt,
    OutputFormat,
    OutputOpt,
    PeakTflopsOpt,
    PlotOpt,
    PredictOpt,
    PreflightOpt,
    QloraOpt,
    RecipeDtypeOpt,
    RecipeOpt,
    RecipeStrategyOpt,
    RevisionOpt,
    SaveProfileOpt,
    SearchMarginOpt,
    SeedOpt,
    SeqLenOpt,
    ShardSizeOpt,
    StepsOpt,
    TrialTimeoutOpt,
    TrustOpt,
    UnitsOpt,
    WarmupOpt,
)
from optprof.cli.output import destination, finish
from optprof.config import (
    CompareConfig,
    DeviceKind,
    SearchSettings,
    TrainingSettings,
    check_offload,
    resolve_device,
    resolve_micro_batch,
    resolve_shard_size,
)
from optprof.errors import UsageError
from optprof.files import check_folder
from optprof.trainers import step_choice
from optprof.units import parse_bytes


def compare(
    model: ModelArg = DEFAULT_MODEL, optimizer: OptimizerOpt = None, opt_arg: OptArgOpt = None,
    device: AutoDeviceOpt = None, dtype: RecipeDtypeOpt = None, amp: AmpOpt = None, recipe: RecipeOpt = None,
    mp_policy: MpPolicyOpt = None, activation_checkpointing: ActivationCheckpointingOpt = None, loss: LossOpt = None,
    seq_len: SeqLenOpt = None, micro_batch: MicroBatchOpt = None, memory_limit: MemoryLimitOpt = None,
    max_micro_batch: MaxMicroBatchOpt = SearchSettings.max_micro_batch,
    search_margin: SearchMarginOpt = SearchSettings.margin, grad_accum: GradAccumOpt = TrainingSettings.grad_accum,
    grad_clip: GradClipOpt = None, gradient_checkpointing: CheckpointingOpt = False,
    steps: StepsOpt = TrainingSettings.steps, warmup: WarmupOpt = TrainingSettings.warmup,
    peak_tflops: PeakTflopsOpt = None, breakdown: BreakdownOpt = TrainingSettings.breakdown,
    trial_timeout: TrialTimeoutOpt = CompareConfig.trial_timeout_s, save_profile: SaveProfileOpt = None,
    gpus: GpusOpt = None, strategy: RecipeStrategyOpt = None, shard_size: ShardSizeOpt = None,
    seed: SeedOpt = TrainingSettings.seed, predict: PredictOpt = CompareConfig.predict,
    preflight: PreflightOpt = CompareConfig.preflight, memory_snapshot: MemorySnapshotOpt = None,
    offload_optimizer: OffloadOpt = CompareConfig.offload_optimizer, revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False, lora: LoraOpt = None, qlora: QloraOpt = None, freeze: FreezeOpt = None,
    attention: AttentionOpt = None, output_format: FormatOpt = OutputFormat.TABLE, output: OutputOpt = None,
    units: UnitsOpt = None, plot: PlotOpt = None, gpu: GpuOpt = None, gpu_spec: GpuSpecOpt = None,
) -> None:
    """Train MODEL for a few real steps under each optimizer and measure memory, time and throughput.

    Each optimizer runs in a fresh process on synthetic tokens: warm-up steps, then timed steps (forward,
    backward and optimizer step timed apart) with memory sampled in the background, then one untimed step
    under torch's MemTracker for the tensor-level peak. With --micro-batch auto, short probe trials first
    find the largest micro-batch that fits each optimizer; it is then measured there, and at the largest
    size every optimizer fits. Exit code 1 if a trial failed (out of memory, or not fitting at
    micro-batch 1, is a result, not a failure), 2 on bad input.
    """
    # every path this command writes, checked before anything is imported or loaded
    to = destination(output_format, output, units, plot, save_profile)
    if memory_snapshot is not None:
        check_folder(memory_snapshot, "--memory-snapshot")
    from optprof.commands.compare import run_compare
    from optprof.distributed.torchrun import ranks_per_node, resolve_ranks, torchrun_rank
    from optprof.optimizers.registry import parse_opt_args
    from optprof.render.compare import trial_line
    from optprof.render.console import console

    kind = resolve_device(device)
    world, joined = resolve_ranks(kind, gpus, device_given=device is not None)
    step = step_choice(recipe, dtype, strategy, amp, mp_policy, activation_checkpointing, gradient_checkpointing, loss,
                       world, lambda: loaded_dtype(model, revision, trust_remote_code))
    check_offload(offload_optimizer, kind, world, step.strategy)
    on_cpu = kind != DeviceKind.CUDA
    if memory_snapshot is not None and (on_cpu or not breakdown):
        raise UsageError("--memory-snapshot records CUDA's allocator over the tracked step: it needs --device cuda "
                         "and --breakdown" + ("; there is no CUDA allocator on --device cpu" if on_cpu else ""))
    if qlora is not None and world > 1:
        raise UsageError("--qlora runs on one device for now (FSDP over 4-bit parameters is not set up); drop --gpus")
    limit = None if memory_limit is None else parse_bytes(memory_limit, "--memory-limit")
    time_settings(gpu, gpu_spec, None, None, kind, world)
    if gpu is not None and not predict:
        raise UsageError("--gpu predicts each row's step time: drop --no-predict")
    fixed = resolve_micro_batch(micro_batch, kind, limit is not None)
    if save_profile is not None and fixed is None:
        raise UsageError("--save-profile needs a fixed --micro-batch (a profile names one)")
    training = TrainingSettings(
        device=kind, seq_len=seq_len, micro_batch=fixed or 1, grad_accum=grad_accum, grad_clip=grad_clip,
        steps=steps, warmup=warmup, breakdown=breakdown, peak_tflops=peak_tflops, memory_limit_bytes=limit, seed=seed,
        **step.fields)
    run_config = CompareConfig(
        model_selection(model, step.dtype, revision, trust_remote_code, lora, freeze, qlora, attention),
        tuple(optimizer or ()), training, parse_opt_args(opt_arg or []),
        search=SearchSettings(max_micro_batch, search_margin) if fixed is None else None, gpus=world,
        strategy=step.strategy, torchrun=joined, trial_timeout_s=trial_timeout, predict=predict, preflight=preflight,
        offload_optimizer=offload_optimizer,
        memory_snapshot_dir=None if memory_snapshot is None else str(memory_snapshot), gpu=gpu,
        gpu_spec=None if gpu_spec is None else str(gpu_spec),
        shard_size=resolve_shard_size(step.strategy, world, shard_size, ranks_per_node() if joined else None))
    err = console(stderr=True)
    reporter = torchrun_rank() == 0  # under torchrun, rank 0 prints and writes the report; the others are quiet
    if not reporter:
        run_compare(run_config, quiet=not SESSION.debug)
        return
    with err.status(f"comparing optimizers on {model} ...") as status:
        result = run_compare(run_config, on_progress=lambda name, text: status.update(f"{name}: {text}"),
                             on_row=lambda row: err.print(trial_line(row)), quiet=not SESSION.debug)
    finish(result, to, save_profile, "compare")
