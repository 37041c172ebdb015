"""`optprof predict`: its flags -> PredictConfig -> the report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from optprof.cli.inputs import (
    allocator_settings,
    calibration_bytes,
    fake_ranks,
    loaded_dtype,
    model_selection,
    one_device,
    outside_reserve,
    time_settings,
)
from optprof.cli.options import (
    DEFAULT_MODEL,
    ActivationCheckpointingOpt,
    AllocConfOpt,
    AmpOpt,
    AttentionOpt,
    CalibrationOpt,
    CheckpointingOpt,
    DeviceOpt,
    FormatOpt,
    FreezeOpt,
    GpuMemoryOpt,
    GpuOpt,
    GpusOpt,
    GpuSpecOpt,
    GpusPerNodeOpt,
    GradAccumOpt,
    JobsOpt,
    LoraOpt,
    LossOpt,
    MaxMicroBatchOpt,
    MicroBatchOpt,
    ModelArg,
    MpPolicyOpt,
    NetworkOpt,
    OptArgOpt,
    OptimizerOpt,
    OutputFormat,
    OutputOpt,
    PlotOpt,
    PredictedSnapshotOpt,
    PredictFullModelOpt,
    QloraOpt,
    RecipeDtypeOpt,
    RecipeOpt,
    RecipeStrategyOpt,
    ReserveOpt,
    RevisionOpt,
    SaveProfileOpt,
    SeqLenOpt,
    ShardSizeOpt,
    TrustOpt,
    UnitsOpt,
)
from optprof.cli.output import destination, finish
from optprof.config import (
    Amp,
    DeviceKind,
    Dtype,
    PredictConfig,
    Strategy,
    TrainingSettings,
    default_jobs,
    whole_number,
)
from optprof.errors import UsageError
from optprof.files import check_writable
from optprof.trainers import step_choice
from optprof.units import parse_bytes


def predict(
    model: ModelArg = DEFAULT_MODEL, optimizer: OptimizerOpt = None, opt_arg: OptArgOpt = None,
    gpu_memory: GpuMemoryOpt = None, reserve: ReserveOpt = None, gpus: GpusOpt = PredictConfig.gpus,
    strategy: RecipeStrategyOpt = None, shard_size: ShardSizeOpt = None,
    device: DeviceOpt = DeviceKind.CUDA, dtype: RecipeDtypeOpt = None, amp: AmpOpt = None,
    recipe: RecipeOpt = None, mp_policy: MpPolicyOpt = None,
    activation_checkpointing: ActivationCheckpointingOpt = None, loss: LossOpt = None,
    alloc_conf: AllocConfOpt = None, memory_snapshot: PredictedSnapshotOpt = None,
    seq_len: SeqLenOpt = None, micro_batch: MicroBatchOpt = str(TrainingSettings.micro_batch),
    grad_accum: GradAccumOpt = TrainingSettings.grad_accum,
    gradient_checkpointing: CheckpointingOpt = False,
    max_micro_batch: MaxMicroBatchOpt = PredictConfig.max_micro_batch, revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False, output_format: FormatOpt = OutputFormat.TABLE, output: OutputOpt = None,
    units: UnitsOpt = None, plot: PlotOpt = None, save_profile: SaveProfileOpt = None, jobs: JobsOpt = None,
    lora: LoraOpt = None, qlora: QloraOpt = None, freeze: FreezeOpt = None, attention: AttentionOpt = None,
    gpu: GpuOpt = None, gpu_spec: GpuSpecOpt = None, network: NetworkOpt = None, gpus_per_node: GpusPerNodeOpt = None,
    calibration: CalibrationOpt = None, full_model: PredictFullModelOpt = PredictConfig.full_model,
) -> None:
    """Predict peak memory per device (and the largest micro-batch) without a GPU, from fake tensors; with --gpu,
    also the step time, tokens/s and MFU on that GPU.

    The training step (forward, backward, the real optimizer's step) runs on fake tensors, which have
    shapes but no memory, under torch's MemTracker; with --gpus N, under FSDP2 on a fake process group.
    Every figure is labelled predicted, and the output lists what fake CPU tensors cannot see.
    Exit code 1 if an optimizer failed, 2 on bad input.
    """
    # every path this command writes, checked before anything is imported or loaded
    to = destination(output_format, output, units, plot, save_profile)
    if memory_snapshot is not None:
        check_writable(memory_snapshot, "--memory-snapshot")
    from optprof.commands.predict import run_predict
    from optprof.render.console import console
    from optprof.render.tables import prediction_line

    run_config = predict_config(
        model, optimizer, opt_arg, gpu_memory, reserve, gpus, strategy, shard_size, device, dtype, amp, recipe,
        mp_policy, activation_checkpointing, loss, alloc_conf, memory_snapshot, seq_len, micro_batch, grad_accum,
        gradient_checkpointing, max_micro_batch, revision, trust_remote_code, lora, qlora, freeze, attention, gpu,
        gpu_spec, network, gpus_per_node, calibration, jobs)
    run_config = dataclasses.replace(run_config, full_model=full_model)
    one_device(run_config.gpus, save_profile)
    err = console(stderr=True)
    with err.status(f"predicting on fake tensors for {model} ...") as status:
        result = run_predict(run_config, on_progress=lambda name, text: status.update(f"{name}: {text}"),
                             on_row=lambda row: err.print(prediction_line(row)))
    finish(result, to, save_profile, "predict")


def predict_config(
    model: str, optimizer: list[str] | None, opt_arg: list[str] | None, gpu_memory: str | None,
    reserve: str | None, gpus: int | None, strategy: Strategy | None, shard_size: int | None, device: DeviceKind,
    dtype: Dtype | None, amp: Amp | None, recipe: str | None, mp_policy: str | None,
    activation_checkpointing: str | None, loss: str | None, alloc_conf: str | None, memory_snapshot: Path | None,
    seq_len: int | None, micro_batch: str | None, grad_accum: int, gradient_checkpointing: bool,
    max_micro_batch: int, revision: str | None, trust_remote_code: bool, lora: str | None, qlora: str | None,
    freeze: list[str] | None, attention: str | None, gpu: str | None, gpu_spec: Path | None, network: str | None,
    gpus_per_node: int | None, calibration: Path | None, jobs: int | None,
) -> PredictConfig:
    """predict's flags as its PredictConfig (`optprof plan` builds one per setup the same way)."""
    from optprof.optimizers.registry import parse_opt_args

    step = step_choice(recipe, dtype, strategy, amp, mp_policy, activation_checkpointing, gradient_checkpointing, loss,
                       gpus or 1, lambda: loaded_dtype(model, revision, trust_remote_code))
    # a recipe that replicates the model (DDP) is predicted on one device: each rank holds the same
    sharded_ranks = (gpus or 1) > 1 and not step.replicated
    fake = fake_ranks(gpus if sharded_ranks else 1,
                      step.strategy if sharded_ranks else strategy or PredictConfig.strategy, shard_size, "predict")
    training = TrainingSettings(
        device=device, seq_len=seq_len,
        micro_batch=whole_number(micro_batch or str(TrainingSettings.micro_batch), "--micro-batch"),
        grad_accum=grad_accum, **step.fields)
    allocator = allocator_settings(device, alloc_conf, memory_snapshot)
    target = time_settings(gpu, gpu_spec, network, gpus_per_node, device, gpus or 1)
    if gpu_memory is None and target.memory_bytes is not None:
        gpu_memory = str(target.memory_bytes)
    if reserve is not None and calibration is not None:
        raise UsageError("--reserve and --calibration both replace the costs outside the allocator: give one")
    if calibration is not None and allocator is None:
        raise UsageError("--calibration is a CUDA card's measurement: use it with --device cuda")
    reserve_bytes = (parse_bytes(reserve, "--reserve", allow_zero=True) if reserve is not None
                     else calibration_bytes(calibration) if calibration is not None
                     else outside_reserve(device, fake.ranks, fake.strategy, fake.shard_size, allocator is not None,
                                          gpu, gpu_spec, gpus_per_node))
    run_config = PredictConfig(
        model_selection(model, step.dtype, revision, trust_remote_code, lora, freeze, qlora, attention),
        tuple(optimizer or ()), training, parse_opt_args(opt_arg or []), max_micro_batch=max_micro_batch,
        gpus=fake.ranks, strategy=fake.strategy, shard_size=fake.shard_size, jobs=jobs or default_jobs(),
        replicas=gpus or 1 if step.replicated else 1,
        gpu_memory_bytes=None if gpu_memory is None else parse_bytes(gpu_memory, "--gpu-memory"),
        alloc_conf=allocator, memory_snapshot=None if memory_snapshot is None else str(memory_snapshot),
        reserve_bytes=reserve_bytes,
        gpu=gpu, gpu_spec=None if gpu_spec is None else str(gpu_spec), network=network, gpus_per_node=gpus_per_node,
        calibration=None if calibration is None else str(calibration))
    if run_config.gpu_memory_bytes is not None and run_config.gpu_memory_bytes <= run_config.reserve_bytes:
        raise UsageError("--gpu-memory must be larger than --reserve")
    return run_config
