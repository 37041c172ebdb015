"""`optprof plan`: its flags -> one PredictConfig per setup (as predict's flags would build it) -> the report."""

from __future__ import annotations

from optprof.cli.options import (
    DEFAULT_MODEL,
    AllocConfOpt,
    AmpOpt,
    CheckpointingModesOpt,
    ConfirmOpt,
    DeviceOpt,
    FormatOpt,
    GlobalBatchOpt,
    GpuMemoryOpt,
    GpuSpecOpt,
    GpusPerNodeOpt,
    JobsOpt,
    LossesOpt,
    MaxMicroBatchOpt,
    ModelArg,
    MpPolicyOpt,
    NetworkOpt,
    OptArgOpt,
    OptimizerOpt,
    OutputFormat,
    OutputOpt,
    PlanGpuOpt,
    PlanGpusOpt,
    PlotOpt,
    RecipeDtypeOpt,
    RecipeOpt,
    RevisionOpt,
    SeqLenOpt,
    StrategiesOpt,
    TrustOpt,
    UnitsOpt,
)
from optprof.cli.output import destination, finish
from optprof.config import Amp, DeviceKind, PredictConfig, default_jobs
from optprof.errors import UsageError

TOKEN_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def token_count(text: str) -> int:
    """'4M', '4Mi', '512k' or a plain count of tokens; a UsageError otherwise."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    suffix = match.group(2).lower() if match else ""
    if match is None or suffix not in TOKEN_SUFFIXES or float(match.group(1)) <= 0:
        raise UsageError(f"--global-batch: cannot read '{text}' as a token count: use e.g. 4M, 4Mi or 4194304")
    return int(float(match.group(1)) * TOKEN_SUFFIXES[suffix])


def plan(
    model: ModelArg = DEFAULT_MODEL, optimizer: OptimizerOpt = None, opt_arg: OptArgOpt = None,
    gpu: PlanGpuOpt = "h100-sxm", gpus: PlanGpusOpt = 1, global_batch: GlobalBatchOpt = None,
    gpu_memory: GpuMemoryOpt = None, device: DeviceOpt = DeviceKind.CUDA, dtype: RecipeDtypeOpt = None,
    amp: AmpOpt = None, recipe: RecipeOpt = None, mp_policy: MpPolicyOpt = None, alloc_conf: AllocConfOpt = None,
    seq_len: SeqLenOpt = None, max_micro_batch: MaxMicroBatchOpt = PredictConfig.max_micro_batch,
    revision: RevisionOpt = None, trust_remote_code: TrustOpt = False, output_format: FormatOpt = OutputFormat.TABLE,
    output: OutputOpt = None, units: UnitsOpt = None, plot: PlotOpt = None, jobs: JobsOpt = None,
    gpu_spec: GpuSpecOpt = None, network: NetworkOpt = None, gpus_per_node: GpusPerNodeOpt = None,
    confirm: ConfirmOpt = True, strategy: StrategiesOpt = None, activation_checkpointing: CheckpointingModesOpt = None,
    loss: LossesOpt = None,
) -> None:
    """The fastest predicted setup that fits, per optimizer: how to shard, checkpoint and batch the model on GPUS x
    GPU, searched from fake tensors (nothing runs on a GPU).

    Every setup (FSDP2 over all GPUs, HSDP in smaller shard groups, zero2; each activation checkpointing mode;
    the full or the chunked loss) is predicted as `optprof predict` would, at its largest micro-batch or, with
    --global-batch, the fastest micro-batch and gradient accumulation that reach it. The chosen setup per optimizer
    prints as the predict command that reproduces it, and is confirmed by that full predict (--no-confirm skips it).
    Without --recipe, --amp, --dtype or --mp-policy, the step is bf16 autocast over float32 weights.
    Exit code 1 if a setup failed, 2 on bad input.
    """
    to = destination(output_format, output, units, plot)
    from optprof.cli.predict import predict_config
    from optprof.commands.plan import CHECKPOINTING, LOSSES, PlanConfig, run_plan, setups
    from optprof.render.console import console

    if device != DeviceKind.CUDA:
        raise UsageError("plan searches for a CUDA card: --device cuda")
    if recipe is None and amp is None and dtype is None and mp_policy is None:
        amp = Amp.BF16  # what people train with; float32 throughout would plan for a step nobody runs
    tokens = None if global_batch is None else token_count(global_batch)
    def listed(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
        return default if text is None else tuple(part.strip() for part in text.split(",") if part.strip())

    chosen = setups(gpus, gpus_per_node or 8, None if strategy is None else listed(strategy, ()),
                    listed(activation_checkpointing, CHECKPOINTING), listed(loss, LOSSES))
    if not chosen:
        raise UsageError("nothing to search: --strategy, --activation-checkpointing and --loss leave no setup")
    configs = []
    for setup in chosen:  # predict's flags for each setup: its sharding, checkpointing and loss, the rest shared
        configs.append((setup, predict_config(
            model=model, optimizer=optimizer, opt_arg=opt_arg, gpu_memory=gpu_memory, reserve=None, gpus=gpus,
            strategy=setup.strategy if gpus > 1 else None, shard_size=setup.shard_size, device=device, dtype=dtype,
            amp=amp, recipe=recipe, mp_policy=mp_policy, activation_checkpointing=setup.activation_checkpointing,
            loss=setup.loss, alloc_conf=alloc_conf, memory_snapshot=None, seq_len=seq_len, micro_batch="1",
            grad_accum=1, gradient_checkpointing=False, max_micro_batch=max_micro_batch, revision=revision,
            trust_remote_code=trust_remote_code, lora=None, qlora=None, freeze=None, attention=None, gpu=gpu,
            gpu_spec=gpu_spec, network=network, gpus_per_node=gpus_per_node, calibration=None, jobs=1)))
    reproduce = " ".join(["optprof predict", model, f"--gpu {gpu}", f"--gpus {gpus}" if gpus > 1 else "",
                          f"--recipe {recipe}" if recipe else "", f"--amp {amp}" if amp else "",
                          f"--dtype {dtype}" if dtype else "", f"--mp-policy {mp_policy}" if mp_policy else "",
                          f"--seq-len {seq_len}" if seq_len else "",
                          f"--gpu-memory {gpu_memory}" if gpu_memory else ""]).replace("  ", " ").strip()
    reproduce = " ".join(reproduce.split())
    config = PlanConfig(tuple(configs), reproduce, tokens, confirm, jobs or default_jobs())
    err = console(stderr=True)
    with err.status(f"planning {model} on {gpus} x {gpu} ...") as status:
        report = run_plan(config, on_progress=status.update)
    finish(report, to, None, None)
