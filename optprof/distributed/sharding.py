"""How a model is spread over ranks, and the stand-ins that let one CPU process act as N ranks.

- `wrap_for_strategy`: DDP replicates; FSDP2 (`shard_fsdp`) shards one unit per transformer block, with the
  parameters kept gathered after forward for zero2, over a 2-D mesh (replicas x shard group) for hsdp.
- `fake_process_group`: N ranks in one process (torch's fake backend), for state-size and predict.
- `fake_tensors`: FakeTensorMode with placeholder scalars, so a 7B step runs without memory.
- `adam_mini_on_cpu_ranks`: adam-mini assumes CUDA for its all-reduce; on CPU ranks it gets the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

from optprof.config import REPLICATED_STRATEGIES, DeviceKind, FsdpUnits, Strategy, TrainingSettings, mesh_shape
from optprof.model.info import transformer_blocks
from optprof.model.setups import movable_fake_parameters
from optprof.optimizers.registry import distributed_world_size
from optprof.optimizers.state import PlaceholderScalars


def shard_fsdp(model: Any, mesh: Any, strategy: Strategy = Strategy.FSDP, offload: bool = False,
               training: TrainingSettings | None = None) -> None:
    """FSDP2 as it is usually applied: each transformer block its own unit (transformers names the block
    classes in `_no_split_modules`), then the root for the rest (embeddings, final norm, head).

    zero2 keeps each unit's parameters gathered from forward to backward (no re-gather in backward): only
    the state and the gradients stay sharded. `offload`: FSDP2's CPUOffloadPolicy (pinned host memory) keeps
    the sharded parameters and gradients on the host, so the optimizer steps there and its state lives there.
    `training` gives the MixedPrecisionPolicy (--mp-policy) and how the ends of the model are grouped
    (`FsdpUnits`: torchtitan's, accelerate's and torchtune's layouts).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    training = training or TrainingSettings()
    reshard = strategy != Strategy.ZERO2
    options = {"mesh": mesh, "offload_policy": CPUOffloadPolicy(pin_memory=True) if offload else OffloadPolicy(),
               "mp_policy": mixed_precision_policy(training) or MixedPrecisionPolicy()}
    for module in transformer_blocks(model):
        fully_shard(module, reshard_after_forward=reshard, **options)
    if training.fsdp_units != FsdpUnits.BLOCKS:
        _shard_ends(model, training.fsdp_units, reshard, options)
    fully_shard(model, **options)  # the root: FSDP2 keeps it gathered after forward (reshard_after_forward=None)


def final_norm(model: Any) -> Any:
    """The last norm among the base model's direct children (accelerate's `_find_final_norm`), or None."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else model
    found = None
    for module in (base.children() if base is not None else ()):
        if "Norm" in type(module).__name__:
            found = module
    return found


def _shard_ends(model: Any, units: FsdpUnits, reshard: bool, options: dict[str, Any]) -> None:
    """The embeddings and the head as their own units. ends-gathered: final norm and head kept gathered after
    forward (torchtitan's apply_fsdp_to_decoder, accelerate's fsdp2_prepare_model), the embeddings resharded;
    tied weights keep the embeddings gathered instead of the head. ends-sharded: embeddings and head each resharded
    (torchtune's shard_model with custom_sharded_layers).

    The trainers group [norm, head] into one unit; here each is its own unit with the same resharding, which
    holds the same memory at every point (grouping only merges their all-gathers) and keeps torch's
    FSDPMemTracker working: it wraps a grouped unit's shared state once per module and leaves a stale wrapper.
    """
    from torch.distributed.fsdp import fully_shard

    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and getattr(embeddings, "weight", None) is getattr(head, "weight", None)
    ends = [embeddings] if tied else [embeddings, head]
    if units == FsdpUnits.ENDS_SHARDED:
        for module in ends:
            if module is not None:
                fully_shard(module, reshard_after_forward=reshard, **options)
        return
    if not tied and embeddings is not None:
        fully_shard(embeddings, reshard_after_forward=reshard, **options)
    for module in (final_norm(model), embeddings if tied else head):
        if module is not None:
            fully_shard(module, reshard_after_forward=False, **options)


def mixed_precision_policy(training: TrainingSettings) -> Any:
    """FSDP2's MixedPrecisionPolicy for --mp-policy, or None. Forward inputs are not cast (torchtitan's
    cast_forward_inputs=False: token ids need none)."""
    if training.mp_param is None:
        return None
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    param = getattr(torch, training.mp_param.dtype)
    reduce = getattr(torch, training.mp_reduce.dtype) if training.mp_reduce is not None else None
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce, cast_forward_inputs=False)


def device_mesh(device_type: str, strategy: Strategy, world_size: int, shard_size: int | None) -> Any:
    """The mesh FSDP2 shards over: 1-D, or for hsdp 2-D, where FSDP2 replicates along the first dimension and
    shards along the second."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = mesh_shape(strategy, world_size, shard_size)
    names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
    return init_device_mesh(device_type, shape, mesh_dim_names=names)


def wrap_for_strategy(model: Any, strategy: Strategy, device_type: DeviceKind, device_index: int | None,
                      shard_size: int | None = None, offload: bool = False,
                      training: TrainingSettings | None = None) -> Any:
    """The model as the ranks of the current process group train it: DDP replicates it, FSDP2 shards it in
    place (with `offload`, onto the host: see `shard_fsdp`)."""
    import torch.distributed as dist

    if strategy in REPLICATED_STRATEGIES:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device_index] if device_type == DeviceKind.CUDA else None)
    shard_fsdp(model, device_mesh(device_type, strategy, dist.get_world_size(), shard_size), strategy, offload,
               training)
    return model


def zero1_optimizer(build: Callable[[], Any]) -> Any:
    """ZeRO stage 1: torch's ZeroRedundancyOptimizer, each rank keeping the state of its share of the
    parameters (whole parameters, balanced by size). The local optimizer is the registry's, built for the
    whole model as usual (model-aware settings intact), then restricted to the rank's share, group by group:
    ZeRO keeps its parameter groups and the local optimizer's in step, one for one."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    template = build()
    originals = {id(view): original for view, original in getattr(template, "views", [])}  # adam-mini's views
    groups = [{**{k: v for k, v in group.items() if k != "params"},
               "params": [originals.get(id(p), p) for p in group["params"]]} for group in template.param_groups]

    def local_optimizer(shares: list[dict[str, Any]], **_: Any) -> Any:
        optimizer = build()
        if hasattr(optimizer, "world_size"):  # adam-mini: its parameters here are whole, so no cross-rank sums
            optimizer.world_size = 1  # (with them, ranks holding different parameters would wait on each other)
        to_original = {id(view): id(original) for view, original in getattr(optimizer, "views", [])}
        for group, share in zip(optimizer.param_groups, shares, strict=True):
            ids = {id(p) for p in share["params"]}
            group["params"] = [p for p in group["params"] if to_original.get(id(p), id(p)) in ids]
        return optimizer

    return ZeroRedundancyOptimizer(groups, optimizer_class=local_optimizer)  # type: ignore[arg-type]


@contextlib.contextmanager
def fake_process_group(world_size: int, strategy: Strategy = Strategy.FSDP,
                       shard_size: int | None = None) -> Iterator[Any]:
    """`world_size` ranks in this one process (torch's fake backend: collectives return at once); yields the
    device mesh. Every rank of an FSDP run holds the same shapes, so rank 0 stands for all."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group already exists in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield device_mesh("cpu", strategy, world_size, shard_size)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def gloo_reduce_scatter_copies() -> Iterator[None]:
    """On CPU ranks, gloo's reduce-scatter first copies its whole input (a real gloo step's allocation trace shows
    a temporary the input's size, allocated and freed inside `reduce_scatter_single`); the fake process group
    allocates nothing. A step predicted for CPU ranks allocates that copy too, so it peaks where gloo does."""
    import torch
    import torch.distributed as dist

    original = dist.reduce_scatter_single

    def reduce_scatter_single(output: Any, input: Any, *args: Any, **kwargs: Any) -> Any:
        copy = torch.empty_like(input)
        try:
            return original(output, input, *args, **kwargs)
        finally:
            del copy

    dist.reduce_scatter_single = reduce_scatter_single
    try:
        yield
    finally:
        dist.reduce_scatter_single = original


def _is_tracing_without_fake(tensor: Any = None) -> bool:
    from transformers.utils.import_utils import is_jit_tracing, is_torchdynamo_compiling

    return bool(is_torchdynamo_compiling() or is_jit_tracing())


@contextlib.contextmanager
def _transformers_treat_fake_as_real() -> Iterator[None]:
    """transformers takes fake tensors for graph tracing and then builds explicit attention masks, which
    a real run does not: turn that off, so the fake step allocates what the real one does."""
    import transformers.utils.import_utils as import_utils

    original = import_utils.is_tracing
    patched = [m for m in list(sys.modules.values())
               if getattr(m, "__name__", "").startswith("transformers") and getattr(m, "is_tracing", None) is original]
    for module in patched:
        module.is_tracing = _is_tracing_without_fake  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module in patched:
            module.is_tracing = original  # type: ignore[attr-defined]


@contextlib.contextmanager
def _experts_without_grouped_mm_kernel() -> Iterator[None]:
    """Mixture-of-experts layers on fake tensors: transformers' default experts path calls torch's grouped_mm,
    whose shape function insists on CUDA's bfloat16 even for a CPU float32 step. Send it to transformers' own
    fallback op instead, whose fake kernel gives the same tensors: an output of tokens x top-k rows, and
    gradients the size of the input and the expert weights. Neither depends on how tokens are routed."""
    try:
        import transformers.integrations.moe as moe
    except ImportError:  # an older transformers: no grouped experts path to redirect
        yield
        return
    original = moe._can_use_grouped_mm
    moe._can_use_grouped_mm = lambda *args, **kwargs: False
    try:
        yield
    finally:
        moe._can_use_grouped_mm = original


@contextlib.contextmanager
def _fake_kernel_errors_unlogged() -> Iterator[None]:
    """FakeTensorMode logs a traceback for each kernel that refuses a fake input before raising; the error
    itself reaches the row's reason, so the log would only repeat it, page after page."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def fake_tensors() -> Iterator[PlaceholderScalars]:
    """Everything created inside is a fake tensor; value reads get placeholders (as on meta), counted."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with (FakeTensorMode(allow_non_fake_inputs=True), PlaceholderScalars() as scalars,
          _transformers_treat_fake_as_real(), _experts_without_grouped_mm_kernel(), _fake_kernel_errors_unlogged(),
          _truncated_normal_without_rejection(), movable_fake_parameters()):
        yield scalars


def _truncated_normal(tensor: Any, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0,
                      generator: Any = None) -> Any:
    """trunc_normal_ on a tensor without values: one normal draw, clamped, both in place (what the real one
    allocates: nothing beyond its temporaries, which a fake tensor never holds)."""
    import torch

    with torch.no_grad():
        return tensor.normal_(mean, std, generator=generator).clamp_(a, b)


@contextlib.contextmanager
def _truncated_normal_without_rejection() -> Iterator[None]:
    """torch's trunc_normal_ redraws until no value lies outside [a, b] (`_no_grad_trunc_normal_`: `while True:
    ... if not mask.any(): break`); on fake tensors `mask.any()` is a placeholder that always says True, so the
    loop never ends (gemma3's, ModernBERT's and every SigLIP / ViT tower's init). Inside, it draws once and clamps;
    transformers' init wrappers look the function up in TORCH_INIT_FUNCTIONS at each call, so that entry too."""
    import torch

    table: dict[str, Any] | None = None
    with contextlib.suppress(ImportError):
        from transformers import initialization

        table = getattr(initialization, "TORCH_INIT_FUNCTIONS", None)
    originals = (torch.nn.init.trunc_normal_, None if table is None else table.get("trunc_normal_"))
    torch.nn.init.trunc_normal_ = _truncated_normal
    if table is not None and originals[1] is not None:
        table["trunc_normal_"] = _truncated_normal
    try:
        yield
    finally:
        torch.nn.init.trunc_normal_ = originals[0]
        if table is not None and originals[1] is not None:
            table["trunc_normal_"] = originals[1]


@contextlib.contextmanager
def adam_mini_on_cpu_ranks() -> Iterator[None]:
    """adam-mini all-reduces a CPU tensor by copying it to `torch.cuda.current_device()`, which fails where
    there is no CUDA. With ranks on CPU (gloo, or the fake process group) that device is the CPU."""
    import torch

    if torch.cuda.is_available() or distributed_world_size() == 1:
        yield
        return
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment, return-value]
    try:
        yield
    finally:
        torch.cuda.current_device = original
