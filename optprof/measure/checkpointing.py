"""Activation checkpointing of a model's transformer blocks: full, every K-th block, or torchtitan's op-level rule.

Each block (a module whose class `_no_split_modules` names) gets its `forward` run under non-reentrant
`torch.utils.checkpoint.checkpoint`. The module's hooks (FSDP2's gather and reshard) stay outside the
checkpoint, so a recomputation in backward finds the parameters FSDP2's pre-backward hook gathered. This works on
real and fake tensors alike, for any model optprof loads.

selective-op follows torchtitan's `SelectiveAC._wrap_block` (torchtitan/distributed/activation_checkpoint.py @
b5bcd76): save the outputs of the partitioner's compute-intensive ops (`get_default_op_list()`), SDPA variants and
`max`, except every second mm (counted separately in forward and in recompute); mms whose weight shape is an MoE
router gate's are always recomputed. One departure: torchtitan also saves `topk` (its MoE keeps the expert choice
stable), but transformers' routers normalise topk's output in place, which a saved output may not see, so here
topk is recomputed like the router that feeds it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from optprof.config import Checkpointing, TrainingSettings
from optprof.model.info import transformer_blocks

if TYPE_CHECKING:
    from torch import nn

ROUTER_GATE_NAMES = ("router", "gate")  # an MoE block's routing linear: `mlp.gate` (Mixtral, Qwen3), `router`


@functools.cache
def save_ops() -> frozenset[Any]:
    """torchtitan's `_get_default_save_ops`, as far as this torch has each op. The CPU flash kernel stands in for
    CUDA's (a step on fake CPU tensors, predicted for CUDA, runs it where CUDA runs the flash kernel). Read once per
    process: the first call imports torch's partitioner (1.2 s), and a selective-op step asks once per block and
    forward."""
    import torch
    from torch._functorch.partitioners import get_default_op_list

    intensive: list[Any] = list(get_default_op_list().compute_intensive_ops)
    ops: set[Any] = {op.default for op in intensive}
    named = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
             "_scaled_dot_product_fused_attention_overrideable", "_scaled_dot_product_flash_attention_for_cpu",
             "max", "linear")
    ops |= {getattr(torch.ops.aten, name).default for name in named if hasattr(torch.ops.aten, name)}
    ops.add(torch._higher_order_ops.flex_attention)
    ops.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)
    return frozenset(ops)


def router_gate_shapes(block: nn.Module) -> set[tuple[int, int]]:
    """(in, out) of the block's MoE router linears: their mms are recomputed, never saved (torchtitan's
    force_recompute_mm_shapes_by_fqns, 'moe.router.gate')."""
    shapes = set()
    for name, module in block.named_modules():
        weight = getattr(module, "weight", None)
        if name.rsplit(".", 1)[-1] in ROUTER_GATE_NAMES and weight is not None and weight.dim() == 2:
            out_features, in_features = weight.shape  # nn.Linear's layout, as transformers' routers keep it
            shapes.add((in_features, out_features))
    return shapes


def selective_op_policy(gate_shapes: set[tuple[int, int]], saved: list[Any] | None = None) -> Callable[..., Any]:
    """The per-op rule of one forward (and its recomputation). `saved`, when given, collects the ops the policy
    saves in forward (for tests: the count follows the rule)."""
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    ops = save_ops()
    mm_ops = (torch.ops.aten.mm.default, torch.ops.aten.linear.default)
    counts = {"forward": 0, "recompute": 0}

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        mode = "recompute" if ctx.is_recompute else "forward"
        if func in mm_ops:
            shape = tuple(args[1].shape)
            if func == torch.ops.aten.linear.default:
                shape = shape[::-1]  # linear's weight is (out, in)
            if shape in gate_shapes:
                return CheckpointPolicy.PREFER_RECOMPUTE
            counts[mode] += 1
        if func in ops and not (func in mm_ops and counts[mode] % 2 == 0):
            if saved is not None and mode == "forward":
                saved.append(func)
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def checkpoint_block(block: nn.Module, context_fn: Callable[[], Any] | None = None) -> None:
    """Run the block's forward under non-reentrant checkpointing, its hooks outside (see the module docstring)."""
    from torch.utils.checkpoint import checkpoint

    forward = block.forward
    options: dict[str, Any] = {"use_reentrant": False}
    if context_fn is not None:
        options["context_fn"] = context_fn

    @functools.wraps(forward)
    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, **options, **kwargs)

    block.forward = checkpointed


def _selective_contexts(gate_shapes: set[tuple[int, int]]) -> Any:
    """A fresh pair of selective-checkpoint contexts per forward (the policy counts mms within one forward)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(selective_op_policy(gate_shapes))


def apply_checkpointing(model: nn.Module, training: TrainingSettings) -> int:
    """Checkpoint the model's blocks as `training` asks; returns how many blocks were checkpointed."""
    mode = training.checkpointing
    if mode == Checkpointing.NONE:
        return 0
    blocks = transformer_blocks(model)
    if not blocks:
        from optprof.errors import SetupUnsupported

        raise SetupUnsupported("activation checkpointing wraps the transformer blocks that the model's "
                               "_no_split_modules names, and this model names none")
    if mode == Checkpointing.SELECTIVE_OP:
        save_ops()  # read where the model is set up, not in each forward's forked child
    done = 0
    for index, block in enumerate(blocks, start=1):
        if mode == Checkpointing.SELECTIVE_LAYER and index % training.checkpoint_every:
            continue  # torchtitan's layer SAC: the K-th, 2K-th, ... blocks
        if mode == Checkpointing.SELECTIVE_OP:
            checkpoint_block(block, functools.partial(_selective_contexts, router_gate_shapes(block)))
        else:
            checkpoint_block(block)
        done += 1
    return done
