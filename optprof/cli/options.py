"""Every command-line option, declared once: typer `Annotated` aliases that the commands share.

A flag's default lives in the frozen settings of `optprof.config`; each command passes that dataclass field
as its parameter's default (e.g. `steps: StepsOpt = TrainingSettings.steps`), so no default is written twice.
Where a flag means slightly different things to two commands, its help says both.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from optprof.config import MAX_MICRO_BATCH, Amp, DeviceKind, Dtype, Strategy, TuneBudget
from optprof.units import Unit

DEFAULT_MODEL = "demo"  # bundled, about 7M parameters: every command finishes fast on a laptop CPU


class OutputFormat(StrEnum):
    """How a report leaves optprof."""

    TABLE = "table"  # rich tables on the terminal
    JSON = "json"
    CSV = "csv"
    HTML = "html"  # one self-contained page: tables, figures, environment


# ------------------------------------------------------------------------------------------ the model
ModelArg = Annotated[str, typer.Argument(
    help="Bundled config name or alias (see `optprof models`), a local folder with a config.json, "
    "or a Hugging Face hub id (its config only; never weights).", show_default=True)]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Parameter dtype (gradients and state follow it).")]
RecipeDtypeOpt = Annotated[Dtype | None, typer.Option(
    "--dtype", help="Parameter dtype (gradients and state follow it). Default: float32, or the recipe's.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a hub config's own modelling code to run.")]
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
FullModelOpt = Annotated[bool, typer.Option(
    "--full-model", help="Step the whole model, even where copies of its first 1, 2 and 3 layers give the same "
    "figures (each checked affine in the layer count, then extrapolated; faster for deep models).")]
PredictFullModelOpt = Annotated[bool, typer.Option(
    "--full-model", help="Trace the whole model's step, even where the steps of two shallow copies (its first "
    "layers) write its trace exactly (layer-periodic tracing; about half the time for a deep model).")]

# ------------------------------------------------------------------------------------------ optimizers
OptimizerOpt = Annotated[list[str] | None, typer.Option(
    "--optimizer", "-o", help="Optimizer name (repeatable or comma-separated; 'all' for every one, see `optprof "
    "optimizers`), or package.module:ClassName. Default: adamw, adam-mini, adam-mini-paper, adafactor, sgd, "
    "momentum; for tune, the study's eight (sgd, momentum, nesterov, rmsprop, adam, nadam, adamw, adam-mini).")]
OptArgOpt = Annotated[list[str] | None, typer.Option(
    "--opt-arg", help="key=value passed to every selected optimizer (repeatable), e.g. rank=256; tune keeps it "
    "fixed, untuned. A key that no selected optimizer takes is an error.")]
JobsOpt = Annotated[int | None, typer.Option(
    "--jobs", "-j", min=1, help="Optimizers (tune: trials) at once, in forked workers (default: CPU cores, at most "
    "4); the figures do not depend on it.")]

# ------------------------------------------------------------------------------------------ the step
_device = typer.Option("--device", help="compare: where to train (default: cuda when available, else cpu). "
                       "predict: the device to predict for (nothing runs on it).")
DeviceOpt = Annotated[DeviceKind, _device]
AutoDeviceOpt = Annotated[DeviceKind | None, _device]
AmpOpt = Annotated[Amp | None, typer.Option(
    "--amp", help="Mixed precision: float32 master weights, forward and backward under autocast.")]
SeqLenOpt = Annotated[int | None, typer.Option(
    "--seq-len", min=1, help="Tokens per sequence (default: the model's context length, at most 2048 on cuda and "
    f"512 on cpu; tune: {TuneBudget.seq_len}).")]
MicroBatchOpt = Annotated[str | None, typer.Option(
    "--micro-batch", help="Sequences per forward/backward. compare also takes 'auto': the largest that fits, per "
    "optimizer (its default on cuda or with --memory-limit).")]
GradAccumOpt = Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches per optimizer step.")]
GradClipOpt = Annotated[float | None, typer.Option(
    "--grad-clip", min=0.0, help="Clip the gradient norm to this (costs time too).")]
CheckpointingOpt = Annotated[bool, typer.Option(
    "--gradient-checkpointing", help="Recompute every transformer block in backward: --activation-checkpointing full.")]
ActivationCheckpointingOpt = Annotated[str | None, typer.Option(
    "--activation-checkpointing", help="none, full (every transformer block recomputed), selective-layer:K (every "
    "K-th block) or selective-op (torchtitan's rule: save matmul and attention outputs except every second mm, "
    "recompute the rest and MoE router gates). Default: none, or the recipe's.")]
MpPolicyOpt = Annotated[str | None, typer.Option(
    "--mp-policy", help="FSDP2's MixedPrecisionPolicy PARAM[,REDUCE] (fp32, bf16, fp16), e.g. bf16,fp32: parameters "
    "stay in --dtype as shards, forward and backward compute with gathered PARAM copies, gradients reduce in REDUCE "
    "(default PARAM); no autocast. Sharded strategies; on one device FSDP2 over a one-rank mesh.")]
LossOpt = Annotated[str | None, typer.Option(
    "--loss", help="default (the model's loss: full logits upcast to float32, as transformers and torchtitan do) or "
    "chunked:N (torchtune's linear cross-entropy: the head projected and upcast per chunk of tokens).")]
RecipeOpt = Annotated[str | None, typer.Option(
    "--recipe", help="Train as a named trainer does: torchtitan, accelerate-fsdp2, hf-trainer, lightning-bf16-mixed, "
    "torchtune (see `optprof recipes`). Explicit flags override its settings.")]
StepsOpt = Annotated[int, typer.Option(
    "--steps", min=1, help="Optimizer steps: timed per optimizer (compare), or trained per trial (tune).")]
WarmupOpt = Annotated[int, typer.Option(
    "--warmup", help="Untimed steps first (at least 2: lazy state appears in the first).")]
SeedOpt = Annotated[int, typer.Option(
    "--seed", help="Seed for weights and tokens, the same for every optimizer (tune: also its quasi-random points).")]

# ------------------------------------------------------------------------------------------ ranks
GpusOpt = Annotated[int | None, typer.Option(
    "--gpus", min=1, help="Ranks. compare: per trial (torch.distributed; CPU processes on gloo only with --device "
    "cpu; under torchrun, the group's size). state-size and predict: per-rank figures when sharded over this many "
    "ranks (FSDP2 on a fake process group, in this one process).")]
_strategy = typer.Option(
    "--strategy", help="With several ranks: ddp (replicate), zero1 (DDP, optimizer state sharded by "
    "ZeroRedundancyOptimizer), zero2 (FSDP2 keeping parameters gathered after forward: state and gradients "
    "sharded), fsdp (FSDP2, ZeRO-3: one unit per transformer block, then the root) or hsdp (FSDP2 on a 2-D mesh: "
    "sharded inside each shard group, replicated across groups). state-size and predict shard with FSDP2 "
    "(zero2, fsdp, hsdp). optimizers: add a column, whether each optimizer runs under it, decided by one "
    "training step on fake tensors over 2 fake ranks (cached per installed versions).")
StrategyOpt = Annotated[Strategy, _strategy]
RecipeStrategyOpt = Annotated[Strategy | None, _strategy]  # default: the recipe's, else fsdp
StrategyColumnOpt = Annotated[Strategy | None, _strategy]
ShardSizeOpt = Annotated[int | None, typer.Option(
    "--shard-size", min=1, help="hsdp: ranks per shard group, usually one node's (default: torchrun's "
    "LOCAL_WORLD_SIZE, else every rank).")]
OffloadOpt = Annotated[bool, typer.Option(
    "--offload-optimizer", help="FSDP2's CPUOffloadPolicy (CUDA, --gpus N with a sharded strategy): sharded "
    "parameters, gradients and optimizer state in host memory, the step on the CPU.")]

# ------------------------------------------------------------------------------------------ memory
MaxMicroBatchOpt = Annotated[int, typer.Option(
    "--max-micro-batch", min=1, max=MAX_MICRO_BATCH, help="The micro-batch search never tries more.")]
MemoryLimitOpt = Annotated[str | None, typer.Option(
    "--memory-limit", help="Memory a step may use, e.g. 24GiB or 500MB (default on cuda: the card's). On cuda the "
    "allocator is capped there, emulating a smaller card.")]
SearchMarginOpt = Annotated[float, typer.Option(
    "--search-margin", min=0.0, max=0.9, help="Fraction of the limit to leave free when choosing the size to measure.")]
GpuMemoryOpt = Annotated[str | None, typer.Option(
    "--gpu-memory", help="Memory per device, e.g. 80GiB: also predict the largest micro-batch that fits it.")]
GpuOpt = Annotated[str | None, typer.Option(
    "--gpu", help="Predict step time, tokens/s and MFU on this GPU of the hardware catalog (`optprof gpus` lists "
    "them; it also sets the default --gpu-memory), or `local`: op times measured on this machine's device.")]
GpuSpecOpt = Annotated[Path | None, typer.Option(
    "--gpu-spec", help="A TOML file adding GPUs or networks to the catalog, or overriding some of an entry's "
    "figures (the catalog's format: [gpu.NAME] bf16_tflops = 700).")]
NetworkOpt = Annotated[str | None, typer.Option(
    "--network", help="What joins the nodes, per GPU (a catalog network, e.g. ib-400g, roce-200g; default ib-400g).")]
GpusPerNodeOpt = Annotated[int | None, typer.Option(
    "--gpus-per-node", help="GPUs per node: groups beyond it cross the --network (default 8, or --gpus if smaller).")]
CalibrationOpt = Annotated[Path | None, typer.Option(
    "--calibration", help="A compare report (JSON) measured on the card: its measured bytes outside the allocator "
    "(NVML process memory less torch's reserved) replace optprof's named estimates of them.")]
ReserveOpt = Annotated[str | None, typer.Option(
    "--reserve", help="Memory per device outside PyTorch's caching allocator (CUDA context, NCCL buffers), "
    "replacing optprof's named estimates of them (predict on cuda) or its 2GiB guess (compare's checks); 0 on cpu.")]
AllocConfOpt = Annotated[str | None, typer.Option(
    "--alloc-conf", help="The allocator configuration for the caching-allocator model, as torch 2.13 parses it, e.g. "
    "expandable_segments:True or max_split_size_mb:512,roundup_power2_divisions:[256:1,>:4] (default: the "
    "environment's PYTORCH_CUDA_ALLOC_CONF, else PYTORCH_ALLOC_CONF).")]
PredictedSnapshotOpt = Annotated[Path | None, typer.Option(
    "--memory-snapshot", help="Write the simulated allocator's snapshot of the step (torch.cuda.memory._snapshot()'s "
    "format) here, for PyTorch's memory visualiser: a .pickle for pytorch.org/memory_viz, or an .html page "
    "(one file per optimizer when several are predicted).")]
MemorySnapshotOpt = Annotated[Path | None, typer.Option(
    "--memory-snapshot", help="CUDA only: record the allocator's history over each optimizer's tracked step "
    "and dump it into this folder, one file per optimizer (and rank), for PyTorch's memory visualiser.")]

# ------------------------------------------------------------------------------------------ measuring
PeakTflopsOpt = Annotated[float | None, typer.Option(
    "--peak-tflops", min=0.0, help="Device peak TFLOP/s for MFU, when optprof does not know it.")]
BreakdownOpt = Annotated[bool, typer.Option(
    "--breakdown/--no-breakdown", help="One extra untimed step under torch's MemTracker for the tensor-level peak and "
    "its breakdown.")]
TrialTimeoutOpt = Annotated[float, typer.Option(
    "--trial-timeout", min=1.0, help="Seconds per optimizer trial, start-up included.")]
PredictOpt = Annotated[bool, typer.Option("--predict/--no-predict", help="Also predict each row's peak on fake "
                                          "tensors (in this process) and report its error against the measured one.")]
PreflightOpt = Annotated[bool, typer.Option(
    "--preflight/--no-preflight", help="Before launching a trial, decide on fake tensors (in this process) whether the "
    "optimizer runs under the strategy (else `unsupported`) and whether the step can fit (over 110% of the memory "
    "available: `does not fit`).")]

# ------------------------------------------------------------------------------------------ tune
TrialsOpt = Annotated[int, typer.Option("--trials", min=1, help="Points of each optimizer's search space, "
                                        "the same number for every optimizer.")]
EvalSequencesOpt = Annotated[int, typer.Option(
    "--eval-sequences", min=1, help="Held-out windows the final loss averages over.")]
NoiseSeedsOpt = Annotated[int, typer.Option(
    "--noise-seeds", min=0, help="Seeds the best point of each optimizer is trained again with: the noise "
    "margin of the inclusion checks (0: none).")]
SpaceOpt = Annotated[Path | None, typer.Option(
    "--space", help="TOML file of search spaces: [adam] lr = [1e-4, 1e-2], beta2 = 0.999, eps = {low = 1e-8, "
    "high = 1e-6, scale = \"log\"} (scales: log, log1m (1 - x on a log scale), linear).")]
DataOpt = Annotated[Path | None, typer.Option(
    "--data", help="Text to train on: a folder of files, a text file, or a JSONL file with a `text` field "
    "(default: the Python standard library's source). Split by document: every 10th held out.")]

# ------------------------------------------------------------------------------------------ check
ProfilePathsArg = Annotated[list[Path] | None, typer.Argument(
    help="Profile files or folders (searched for *.toml with a [profile] table). Default: the profiles optprof "
    "ships.")]
UpdateOpt = Annotated[bool, typer.Option(
    "--update", help="Rewrite the expected values from this run (comments and tolerances kept).")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Fail on improvements past the tolerance too.")]
JunitOpt = Annotated[Path | None, typer.Option("--junit", help="Also write JUnit XML here (for CI).")]

# ------------------------------------------------------------------------------------------ output
ReportFilesArg = Annotated[list[Path], typer.Argument(
    help="Reports saved with --format json or --output (state-size, compare, predict, check, optimizers, "
    "models). Several of one kind show side by side, each row labelled by its file.")]
FormatOpt = Annotated[OutputFormat, typer.Option(
    "--format", "-f", help="table (terminal), json, csv, or html (one self-contained file: tables, figures, "
    "environment), to stdout or --output. check writes table or json.")]
OutputOpt = Annotated[Path | None, typer.Option(
    "--output", help="Write json, csv or html here (format from --format, else the file suffix).")]
PlotOpt = Annotated[Path | None, typer.Option(
    "--plot", help="Also draw the report's figures to this PNG (memory by category, micro-batch, state, "
    "predicted against measured; tune: each optimizer's best training curve and its best loss against trials "
    "spent: those that fit).")]
SaveProfileOpt = Annotated[Path | None, typer.Option(
    "--save-profile", help="Write a profile (TOML) that guards these results, for `optprof check`.")]
UnitsOpt = Annotated[Unit | None, typer.Option(
    "--units", help="Byte units in tables: gb, gib, mb or mib (default: gb, or mb for small models).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks and library warnings.")]

# ------------------------------------------------------------------------------------------ plan
PlanGpuOpt = Annotated[str, typer.Option(
    "--gpu", help="The GPU of the hardware catalog to plan for (`optprof gpus` lists them; it also sets the "
    "default --gpu-memory).")]
PlanGpusOpt = Annotated[int, typer.Option("--gpus", min=1, help="GPUs to train on.")]
GlobalBatchOpt = Annotated[str | None, typer.Option(
    "--global-batch", help="Tokens per optimizer step over all GPUs (e.g. 4M or 4194304): each setup takes the "
    "fastest micro-batch and gradient accumulation that reach it. Default: each setup at its largest micro-batch, "
    "no accumulation.")]
StrategiesOpt = Annotated[str | None, typer.Option(
    "--strategy", help="Search only these, comma-separated: fsdp, hsdp (sharded within a node), zero2 (default: "
    "all; fsdp alone on one GPU).")]
CheckpointingModesOpt = Annotated[str | None, typer.Option(
    "--activation-checkpointing", help="Search only these modes, comma-separated (default: none, selective-op, "
    "selective-layer:2, full).")]
LossesOpt = Annotated[str | None, typer.Option(
    "--loss", help="Search only these losses, comma-separated (default: default, chunked:8).")]
ConfirmOpt = Annotated[bool, typer.Option(
    "--confirm/--no-confirm", help="Predict each optimizer's chosen setup again by the full method (the whole "
    "model traced at the chosen micro-batch) and report any difference.")]
