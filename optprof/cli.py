"""Command line: flags -> config dataclasses -> a command -> results -> report.

torch and transformers are imported inside the commands so that `optprof --help` stays fast.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from optprof import __version__
from optprof.errors import UsageError
from optprof.quiet import quiet_libraries

if TYPE_CHECKING:
    from optprof.results import Report

DEFAULT_MODEL = "demo"  # bundled, about 7M parameters: every command finishes fast on a laptop CPU

app = typer.Typer(
    name="optprof",
    help="Memory and throughput profiler for LLM training optimizers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Dtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


class Units(StrEnum):
    gb = "gb"  # 10^9 bytes, as the Adam-mini paper's tables
    gib = "gib"  # 2^30 bytes, as nvidia-smi and torch
    mb = "mb"
    mib = "mib"


class DeviceKind(StrEnum):
    cuda = "cuda"
    cpu = "cpu"


class Amp(StrEnum):
    bf16 = "bf16"
    fp16 = "fp16"


class CompareStrategy(StrEnum):
    ddp = "ddp"
    fsdp = "fsdp"


class Strategy(StrEnum):  # commands that shard on fake tensors: FSDP only
    fsdp = "fsdp"


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


ModelArg = Annotated[
    str,
    typer.Argument(
        help="Bundled config name or alias (see `optprof models`), a local folder with a config.json, "
        "or a Hugging Face hub id (its config only; never weights).",
        show_default=True,
    ),
]
OptimizerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--optimizer",
        "-o",
        help="Optimizer name (repeatable or comma-separated; 'all' for every one, see `optprof optimizers`), "
        "or package.module:ClassName. Default: adamw, adam-mini, adam-mini-paper, adafactor, sgd, momentum.",
    ),
]
OptArgOpt = Annotated[
    list[str] | None,
    typer.Option("--opt-arg", help="key=value passed to every selected optimizer (repeatable), e.g. rank=256."),
]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Parameter dtype (gradients and state follow it).")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
TrustOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow a hub config's own modelling code to run.")
]
FormatOpt = Annotated[
    OutputFormat, typer.Option("--format", "-f", help="table (terminal), json or csv (to stdout or --output).")
]
OutputOpt = Annotated[
    Path | None,
    typer.Option("--output", help="Write json or csv here (format from --format, else the file suffix)."),
]
SaveProfileOpt = Annotated[
    Path | None,
    typer.Option("--save-profile", help="Write a profile (TOML) that guards these results, for `optprof check`."),
]
UnitsOpt = Annotated[
    Units | None,
    typer.Option("--units", help="Byte units in tables: gb, gib, mb or mib (default: gb, or mb for small models)."),
]


@app.command("state-size")
def state_size(
    model: ModelArg = DEFAULT_MODEL,
    optimizer: OptimizerOpt = None,
    opt_arg: OptArgOpt = None,
    dtype: DtypeOpt = Dtype.float32,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    output_format: FormatOpt = OutputFormat.table,
    output: OutputOpt = None,
    units: UnitsOpt = None,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", min=1, help="Optimizers measured at once (default: CPU cores, at most 4)."),
    ] = None,
    save_profile: SaveProfileOpt = None,
    gpus: Annotated[
        int, typer.Option("--gpus", min=1, help="Per-rank state when sharded over this many ranks (FSDP2 on a fake "
                          "process group, in this process).")
    ] = 1,
    strategy: Annotated[
        Strategy, typer.Option("--strategy", help="With --gpus > 1: fsdp (FSDP2 shards the state).")
    ] = Strategy.fsdp,
) -> None:
    """Exact optimizer-state bytes per optimizer, measured on the real optimizer over a meta-device model.

    No GPU and no weights needed: the model is built from its config on the meta device, every parameter
    gets a meta gradient, each optimizer takes one real step, and everything it keeps is added up.
    Exit code 1 if an optimizer failed, 2 on bad input.
    """
    from optprof import report
    from optprof.config import ModelSelection, StateSizeConfig
    from optprof.optimizers.registry import parse_opt_args
    from optprof.state_size import default_jobs, run_state_size

    config = StateSizeConfig(
        model=ModelSelection(model, dtype.value, revision, trust_remote_code),
        optimizers=tuple(optimizer or ()),
        opt_args=parse_opt_args(opt_arg or []),
        jobs=jobs or default_jobs(),
        gpus=gpus,
        strategy=strategy.value,
    )
    if save_profile is not None and gpus > 1:
        raise UsageError("--save-profile: profiles describe one device for now; drop --gpus")
    file_format = _file_format(output_format, output)
    err = report.console(stderr=True)
    with err.status(f"measuring optimizer state for {model} ...") as status:
        result = run_state_size(config, on_row=lambda row: status.update(f"measured {row.optimizer}"))
    chosen = units.value if units else None
    _emit(result, output_format, output, file_format, lambda: report.render_state_size(result, chosen))
    if save_profile is not None:
        _save_profile(save_profile, result, "state-size", {"state_bytes": "state_bytes"})
    if result.failed:
        raise typer.Exit(1)


BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, flag: str, allow_zero: bool = False) -> int:
    """'24GiB', '500MB', '1.5gb' or a plain byte count -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in BYTE_UNITS or (float(match.group(1)) == 0 and not allow_zero):
        raise UsageError(f"{flag}: cannot read '{text}' as a size: use e.g. 24GiB, 80GB or 500MB")
    return int(float(match.group(1)) * BYTE_UNITS[unit])


def _positive_int(text: str, flag: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{flag}: expected a whole number of at least 1, or 'auto'; got '{text}'")
    return int(text)


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def _join_torchrun(kind: str) -> None:
    """This process is a torchrun rank: join its group (torchrun set MASTER_ADDR, RANK, WORLD_SIZE...)."""
    import torch
    import torch.distributed as dist

    if kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:  # CPU ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    dist.init_process_group("nccl" if kind == "cuda" else "gloo")


def _pick_device(requested: DeviceKind | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested is DeviceKind.cuda and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UsageError(f"--device cuda: no CUDA device is available (torch {torch.__version__}, {build})")
    return requested.value


@app.command("compare")
def compare(
    model: ModelArg = DEFAULT_MODEL,
    optimizer: OptimizerOpt = None,
    opt_arg: OptArgOpt = None,
    device: Annotated[
        DeviceKind | None, typer.Option("--device", help="Where to train (default: cuda when available, else cpu).")
    ] = None,
    dtype: Annotated[Dtype, typer.Option("--dtype", help="Parameter dtype for pure-precision training.")] = (
        Dtype.float32),
    amp: Annotated[
        Amp | None,
        typer.Option("--amp", help="Mixed precision: float32 master weights, forward and backward under autocast."),
    ] = None,
    seq_len: Annotated[
        int | None,
        typer.Option("--seq-len", min=1, help="Tokens per sequence (default: the model's context length, at most "
                     "2048 on cuda and 512 on cpu)."),
    ] = None,
    micro_batch: Annotated[
        str | None,
        typer.Option("--micro-batch", help="Sequences per forward/backward, or 'auto': the largest that fits, per "
                     "optimizer (default: auto on cuda or with --memory-limit, else 1)."),
    ] = None,
    memory_limit: Annotated[
        str | None,
        typer.Option("--memory-limit", help="Memory a step may use, e.g. 24GiB or 500MB (default on cuda: the "
                     "card's). On cuda the allocator is capped there, emulating a smaller card."),
    ] = None,
    max_micro_batch: Annotated[
        int, typer.Option("--max-micro-batch", min=1, help="The micro-batch search never tries more.")
    ] = 256,
    search_margin: Annotated[
        float, typer.Option("--search-margin", min=0.0, max=0.9,
                            help="Fraction of the limit to leave free when choosing the size to measure.")
    ] = 0.0,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches per optimizer step.")] = 1,
    grad_clip: Annotated[
        float | None, typer.Option("--grad-clip", min=0.0, help="Clip the gradient norm to this (costs time too).")
    ] = None,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Recompute activations in backward to save memory.")
    ] = False,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed optimizer steps per optimizer.")] = 10,
    warmup: Annotated[
        int, typer.Option("--warmup", help="Untimed steps first (at least 2: lazy state appears in the first).")
    ] = 2,
    peak_tflops: Annotated[
        float | None,
        typer.Option("--peak-tflops", min=0.0, help="Device peak TFLOP/s for MFU, when optprof does not know it."),
    ] = None,
    breakdown: Annotated[
        bool, typer.Option("--breakdown/--no-breakdown", help="One extra untimed step under torch's MemTracker "
                           "for the tensor-level peak and its breakdown.")
    ] = True,
    trial_timeout: Annotated[
        float, typer.Option("--trial-timeout", min=1.0, help="Seconds per optimizer trial, start-up included.")
    ] = 1800.0,
    save_profile: SaveProfileOpt = None,
    gpus: Annotated[
        int | None,
        typer.Option("--gpus", min=1, help="Ranks per trial (torch.distributed; with --device cpu, CPU processes on "
                     "gloo). Under torchrun: the group's size."),
    ] = None,
    strategy: Annotated[
        CompareStrategy, typer.Option("--strategy", help="With several ranks: ddp (replicate) or fsdp (FSDP2, shard).")
    ] = CompareStrategy.fsdp,
    seed: Annotated[int, typer.Option("--seed", help="Seed for weights and tokens (the same for every optimizer).")
                    ] = 0,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    output_format: FormatOpt = OutputFormat.table,
    output: OutputOpt = None,
    units: UnitsOpt = None,
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
    from optprof.config import CompareConfig, ModelSelection, SearchSettings, TrainingSettings
    from optprof.optimizers.registry import parse_opt_args

    kind = _pick_device(device)
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if torchrun else (gpus or 1)
    if torchrun and gpus not in (None, world):
        raise UsageError(f"--gpus {gpus} under torchrun, whose group has {world} ranks: drop --gpus")
    if kind == "cuda" and not torchrun and world > _cuda_devices():
        raise UsageError(f"--gpus {world}: only {_cuda_devices()} CUDA devices are visible")
    limit = None if memory_limit is None else parse_bytes(memory_limit, "--memory-limit")
    auto = micro_batch == "auto" or (micro_batch is None and (kind == "cuda" or limit is not None))
    search = SearchSettings(limit, max_micro_batch, search_margin) if auto else None
    fixed = 1 if auto or micro_batch is None else _positive_int(micro_batch, "--micro-batch")
    training = TrainingSettings(
        device=kind, amp=amp.value if amp else None, seq_len=seq_len, micro_batch=fixed,
        grad_accum=grad_accum, grad_clip=grad_clip, gradient_checkpointing=gradient_checkpointing, steps=steps,
        warmup=warmup, breakdown=breakdown, peak_tflops=peak_tflops, seed=seed,
    )
    config = CompareConfig(
        model=ModelSelection(model, dtype.value, revision, trust_remote_code),
        optimizers=tuple(optimizer or ()),
        training=training,
        opt_args=parse_opt_args(opt_arg or []),
        trial_timeout_s=trial_timeout,
        search=search,
        gpus=world,
        strategy=strategy.value,
        torchrun=torchrun,
    )
    file_format = _file_format(output_format, output)
    if torchrun:
        _join_torchrun(kind)
    err = report.console(stderr=True)
    done: list[str] = []
    with err.status(f"comparing optimizers on {model} ...") as status:
        def on_progress(name: str, text: str) -> None:
            status.update(f"[{len(done) + 1}] {name}: {text}")

        def on_row(row: object) -> None:
            done.append(row.optimizer)  # type: ignore[attr-defined]
            err.print(report.trial_line(row))  # type: ignore[arg-type]

        result = run_compare(config, on_progress=on_progress, on_row=on_row, quiet=not _debug)
    if torchrun:
        import torch.distributed as dist

        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:  # rank 0 writes the report
            return
    chosen = units.value if units else None
    _emit(result, output_format, output, file_format, lambda: report.render_compare(result, chosen))
    if save_profile is not None:
        if auto:
            raise UsageError("--save-profile needs a fixed --micro-batch (a profile names one)")
        measured = {"state_bytes": "state_bytes"}
        if kind == "cuda":  # check measures peaks and throughput on GPUs only
            measured |= {"peak_bytes": "peak_bytes", "tokens_per_s": "tokens_per_s"}
        _save_profile(save_profile, result, "compare", measured)
    if result.failed:
        raise typer.Exit(1)


class Strategy(StrEnum):
    fsdp = "fsdp"




@app.command("predict")
def predict(
    model: ModelArg = DEFAULT_MODEL,
    optimizer: OptimizerOpt = None,
    opt_arg: OptArgOpt = None,
    gpu_memory: Annotated[
        str | None,
        typer.Option("--gpu-memory", help="Memory per device, e.g. 80GiB: also predict the largest micro-batch "
                     "that fits it."),
    ] = None,
    reserve: Annotated[
        str | None,
        typer.Option("--reserve", help="Memory per device that tensors do not show: CUDA context, cuBLAS/cuDNN "
                     "workspaces, allocator slack (default 2GiB for cuda, 0 for cpu)."),
    ] = None,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="Ranks (one process, a fake process group).")] = 1,
    strategy: Annotated[
        Strategy, typer.Option("--strategy", help="With --gpus > 1: fsdp (FSDP2, one unit per transformer block).")
    ] = Strategy.fsdp,
    device: Annotated[
        DeviceKind, typer.Option("--device", help="The device to predict for (nothing runs on it).")
    ] = DeviceKind.cuda,
    dtype: Annotated[Dtype, typer.Option("--dtype", help="Parameter dtype for pure-precision training.")] = (
        Dtype.float32),
    amp: Annotated[
        Amp | None, typer.Option("--amp", help="Mixed precision: float32 master weights, autocast.")
    ] = None,
    seq_len: Annotated[
        int | None,
        typer.Option("--seq-len", min=1, help="Tokens per sequence (default: the model's context length, at most "
                     "2048 for cuda and 512 for cpu)."),
    ] = None,
    micro_batch: Annotated[int, typer.Option("--micro-batch", min=1, help="Sequences per forward/backward.")] = 1,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches per optimizer step.")] = 1,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Recompute activations in backward.")
    ] = False,
    max_micro_batch: Annotated[
        int, typer.Option("--max-micro-batch", min=1, help="The largest micro-batch the search considers.")
    ] = 256,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    output_format: FormatOpt = OutputFormat.table,
    output: OutputOpt = None,
    units: UnitsOpt = None,
    save_profile: SaveProfileOpt = None,
) -> None:
    """Predict peak memory per device (and the largest micro-batch) without a GPU, from fake tensors.

    The training step (forward, backward, the real optimizer's step) runs on fake tensors, which have
    shapes but no memory, under torch's MemTracker; with --gpus N, under FSDP2 on a fake process group.
    Every figure is labelled predicted, and the output lists what fake CPU tensors cannot see.
    Exit code 1 if an optimizer failed, 2 on bad input.
    """
    from optprof import report
    from optprof.config import ModelSelection, PredictConfig, TrainingSettings
    from optprof.optimizers.registry import parse_opt_args
    from optprof.predict import DEFAULT_CUDA_RESERVE_BYTES, run_predict

    default_reserve = DEFAULT_CUDA_RESERVE_BYTES if device is DeviceKind.cuda else 0
    config = PredictConfig(
        model=ModelSelection(model, dtype.value, revision, trust_remote_code),
        optimizers=tuple(optimizer or ()),
        training=TrainingSettings(device=device.value, amp=amp.value if amp else None, seq_len=seq_len,
                                  micro_batch=micro_batch, grad_accum=grad_accum,
                                  gradient_checkpointing=gradient_checkpointing),
        opt_args=parse_opt_args(opt_arg or []),
        gpu_memory_bytes=None if gpu_memory is None else parse_bytes(gpu_memory, "--gpu-memory"),
        reserve_bytes=default_reserve if reserve is None else parse_bytes(reserve, "--reserve", allow_zero=True),
        max_micro_batch=max_micro_batch,
        gpus=gpus,
        strategy=strategy.value,
    )
    if config.gpu_memory_bytes is not None and config.gpu_memory_bytes <= config.reserve_bytes:
        raise UsageError("--gpu-memory must be larger than --reserve")
    if save_profile is not None and gpus > 1:
        raise UsageError("--save-profile: profiles describe one device for now; drop --gpus")
    file_format = _file_format(output_format, output)
    err = report.console(stderr=True)
    with err.status(f"predicting on fake tensors for {model} ...") as status:
        result = run_predict(config, on_progress=lambda name, text: status.update(f"{name}: {text}"),
                             on_row=lambda row: err.print(report.prediction_line(row)))
    chosen = units.value if units else None
    _emit(result, output_format, output, file_format, lambda: report.render_predict(result, chosen))
    if save_profile is not None:
        _save_profile(save_profile, result, "predict",
                      {"state_bytes": "state_bytes", "predicted_peak_bytes": "predicted_peak_bytes"})
    if result.failed:
        raise typer.Exit(1)


@app.command("check")
def check(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Profile files or folders (searched for *.toml with a [profile] table). "
                       "Default: the profiles optprof ships."),
    ] = None,
    update: Annotated[
        bool, typer.Option("--update", help="Rewrite the expected values from this run (comments and tolerances "
                           "kept).")
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on improvements past the tolerance too.")] = False,
    junit: Annotated[Path | None, typer.Option("--junit", help="Also write JUnit XML here (for CI).")] = None,
    output_format: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="table (terminal) or json.")
    ] = OutputFormat.table,
) -> None:
    """CI regression check: recompute each profile's measures and compare them with the expected values.

    Optimizer-state bytes and predicted peaks run on any machine; measured peak and tokens/s need a GPU and
    are skipped (and said so) without one. Exit code 0 when every measure holds, 1 on a regression, 2 on a
    usage error or an unreadable profile.
    """
    import json

    from optprof import report
    from optprof.check import run_check, to_dict, to_junit
    from optprof.models import profiles_dir

    if output_format is OutputFormat.csv:
        raise UsageError("check writes table or json (and --junit XML)")
    err = report.console(stderr=True)
    with err.status("checking profiles ...") as status:
        result = run_check(paths or [profiles_dir()], update=update, strict=strict,
                           on_profile=lambda p: status.update(f"checking {p.path} ({p.model})"))
    if junit is not None:
        try:
            junit.write_text(to_junit(result))
        except OSError as exc:
            raise UsageError(f"cannot write '{junit}': {exc.strerror or exc}") from exc
    if output_format is OutputFormat.json:
        typer.echo(json.dumps(to_dict(result), indent=2))
    else:
        report.console().print(report.check_table(result))
    if result.failed:
        raise typer.Exit(1)


@app.command("optimizers")
def optimizers(output_format: FormatOpt = OutputFormat.table) -> None:
    """List the optimizers optprof can profile: package and version, family, available here or why not."""
    import dataclasses
    import json

    from optprof import report
    from optprof.optimizers.registry import INCLUSION_CHAINS, REGISTRY, availability, package_version

    rows = []
    for entry in REGISTRY.values():
        reason = availability(entry)
        rows.append(
            report.OptimizerListing(
                entry.name, entry.package, package_version(entry.package), entry.family,
                reason is None, reason, entry.description,
            )
        )
    if output_format is OutputFormat.table:
        report.console().print(report.optimizers_table(rows, INCLUSION_CHAINS))
    elif output_format is OutputFormat.json:
        body = {"optimizers": [dataclasses.asdict(r) for r in rows], "inclusion_chains": INCLUSION_CHAINS}
        typer.echo(json.dumps(body, indent=2))
    else:
        import pandas as pd

        typer.echo(pd.DataFrame([dataclasses.asdict(r) for r in rows]).to_csv(index=False), nl=False)


@app.command("models")
def models() -> None:
    """List the model configs bundled in profiles/models (usable offline, by name or hub alias)."""
    from optprof import report
    from optprof.models import bundled_models

    rows = [(b.name, b.description, b.aliases) for b in bundled_models().values()]
    report.console().print(report.models_table(rows))


def _save_profile(path: Path, result: Report, command: str, measures: dict[str, str]) -> None:
    """A profile guarding `measures` (profile measure -> result field) of the rows that succeeded."""
    from optprof import report
    from optprof.baseline import profile_text

    settings = {key: result.config.get(key) for key in
                ("dtype", "amp", "seq_len", "micro_batch", "device", "gradient_checkpointing")}
    if command == "state-size":
        settings = {"dtype": result.config.get("dtype")}
    ok = [row for row in result.results if row.status == "ok"]
    expected = {row.optimizer: {m: getattr(row, f) for m, f in measures.items() if getattr(row, f) is not None}
                for row in ok}
    text = profile_text(result.model.name, [row.optimizer for row in ok], settings, expected, command)
    try:
        path.write_text(text)
    except OSError as exc:
        raise UsageError(f"cannot write '{path}': {exc.strerror or exc}") from exc
    report.console(stderr=True).print(f"wrote profile {path}: `optprof check {path}` guards it")


def _file_format(output_format: OutputFormat, output: Path | None) -> str | None:
    if output is None:
        return None
    if output_format is not OutputFormat.table:
        return output_format.value
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in ("json", "csv"):
        raise UsageError(f"cannot tell the format of '{output}': use a .json or .csv name, or --format")
    return suffix


def _serialise(result: Report, fmt: str) -> str:
    from optprof import results

    return results.to_json(result) if fmt == "json" else results.to_csv(result)


def _emit(result: Report, output_format: OutputFormat, output: Path | None,
          file_format: str | None, render: Any) -> None:
    """Table to the terminal, data to stdout, or data to --output (with the table still shown)."""
    from optprof import report

    if output is not None and file_format is not None:
        try:
            output.write_text(_serialise(result, file_format))
        except OSError as exc:
            raise UsageError(f"cannot write '{output}': {exc.strerror or exc}") from exc
        report.console(stderr=True).print(f"wrote {file_format} to {output}")
        if output_format is OutputFormat.table:
            report.console().print(render())
    elif output_format is OutputFormat.table:
        report.console().print(render())
    else:
        typer.echo(_serialise(result, output_format.value), nl=False)


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
