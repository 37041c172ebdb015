"""Adam-mini as the paper defines it (Zhang et al. 2024, Algorithms 1-4).

- Algorithm 2: Query and Key are partitioned by head; every other tensor is one block (PyTorch's default).
  Beyond the paper's dense models: each routed expert is its own block (a 3-D expert tensor splits along
  its first axis); multi-head latent attention (DeepSeek) splits its per-head up-projections, `q_b_proj`
  (Query) and `kv_b_proj` (Key and Value of each head), by head, and keeps the compressed down-projections
  whole; a model without attention (Mamba) has only embedding/output and whole blocks.
- Algorithm 4: the embedding and output layers ("embd_blocks") keep a full, per-element second moment.
- Algorithm 1: elsewhere v is a moving average of mean(g * g) over the block, one value per block.

The official `adam-mini` package (>= 1.1) differs: it keeps one v per row of the embedding and output
layers (and per neuron for values, projections and MLPs), so it saves more than the paper's Table 1.
This module exists so that optprof can reproduce the paper's numbers with a real, stepping optimizer.

Sharded (FSDP2, DTensor parameters split along dim 0): each rank updates its own rows; a block's sum of
squared gradients is all-reduced over the ranks that hold parts of it, so its mean is over the whole block
and the update equals the single-device one. The per-block v is small and the same on every rank.

Update, per Algorithm 1 (eps inside the square root, as line 15 writes it):
    p -= lr * wd * p;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) {g*g | mean(g*g)}
    p -= lr * (m / (1 - b1^t)) / sqrt(v / (1 - b2^t) + eps)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from optprof.model.info import embedding_weights

# Leaf module names of separate query / key projections across common transformers architectures.
QUERY_KEY_NAMES = frozenset({"q_proj", "k_proj", "wq", "wk", "query", "key", "q_lin", "k_lin", "q", "k"})
# Multi-head latent attention's per-head up-projections: one block per head (rows are heads x per-head size).
LATENT_HEAD_NAMES = frozenset({"q_b_proj", "kv_b_proj"})
# Leaf names of fused projections laid out as [Q | K | V] along the output dimension. GPT-NeoX and
# Falcon's `query_key_value` interleave heads instead, so they are left to the default partition.
FUSED_QKV_NAMES = frozenset({"c_attn", "qkv_proj", "Wqkv", "qkv"})


@dataclass(frozen=True)
class Segment:
    """A slice [start, stop) of a tensor along `axis`, cut into `blocks` equal blocks of one v each."""

    axis: int
    start: int
    stop: int
    blocks: int


@dataclass(frozen=True)
class Partition:
    """How one parameter is split. `full=True`: one v per element (embd_blocks)."""

    name: str
    full: bool
    segments: tuple[Segment, ...] = ()

    @property
    def num_blocks(self) -> int:
        return sum(s.blocks for s in self.segments)


def _whole(name: str, param: torch.Tensor) -> Partition:
    axis_len = param.shape[0] if param.dim() else 1
    return Partition(name, full=False, segments=(Segment(0, 0, axis_len, 1),))


def _output_axis(module: nn.Module, param: torch.Tensor) -> int:
    """transformers' Conv1D (GPT-2) stores weights as (in, out); nn.Linear as (out, in)."""
    if param.dim() == 1:
        return 0
    return 1 if type(module).__name__ == "Conv1D" else 0


def _by_heads(name: str, param: torch.Tensor, heads: int) -> Partition:
    """Rows cut into `heads` equal blocks; the whole tensor where the rows are not whole heads."""
    if param.dim() == 2 and param.shape[0] % heads == 0:
        return Partition(name, False, (Segment(0, 0, param.shape[0], heads),))
    return _whole(name, param)


def paper_partition(
    model: nn.Module, *, num_heads: int | None, num_kv_heads: int | None, head_dim: int | None
) -> list[tuple[torch.Tensor, Partition]]:
    """Algorithms 2 and 4 over a transformers causal LM. Each parameter appears once (tied weights too)."""
    embd_ids = {id(weight) for weight in embedding_weights(model) if weight is not None}

    modules = dict(model.named_modules())
    seen: set[int] = set()
    result: list[tuple[torch.Tensor, Partition]] = []
    for name, param in model.named_parameters():  # shared (tied) parameters are yielded once
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        module_name, _, _ = name.rpartition(".")
        leaf = module_name.rpartition(".")[2]
        module = modules.get(module_name)
        if id(param) in embd_ids:
            result.append((param, Partition(name, full=True)))
        elif param.dim() >= 3:  # routed experts stacked on the first axis: one block each
            result.append((param, Partition(name, False, (Segment(0, 0, param.shape[0], param.shape[0]),))))
        elif num_heads is None or num_kv_heads is None or head_dim is None:
            result.append((param, _whole(name, param)))  # no attention heads to split by
        elif leaf in QUERY_KEY_NAMES:
            heads = num_heads if leaf.startswith(("q", "wq")) else num_kv_heads
            result.append((param, _by_heads(name, param, heads)))
        elif leaf in LATENT_HEAD_NAMES:
            result.append((param, _by_heads(name, param, num_heads)))
        elif leaf in FUSED_QKV_NAMES and module is not None:
            axis = _output_axis(module, param)
            q, kv = num_heads * head_dim, num_kv_heads * head_dim
            if param.shape[axis] == q + 2 * kv:
                segments = (
                    Segment(axis, 0, q, num_heads),
                    Segment(axis, q, q + kv, num_kv_heads),
                    Segment(axis, q + kv, q + 2 * kv, 1),  # Value: one block (Algorithm 2's "else")
                )
                result.append((param, Partition(name, False, segments)))
            else:
                result.append((param, _whole(name, param)))
        else:
            result.append((param, _whole(name, param)))
    return result


@dataclass(frozen=True)
class Local:
    """This rank's part of a parameter: the rows [offset, offset + rows) of dim 0, and the process group
    whose ranks hold the other rows (None when this rank holds it all). FSDP2 shards along dim 0."""

    tensor: torch.Tensor
    offset: int
    group: object | None


def local_part(tensor: torch.Tensor) -> Local:
    """A plain tensor as is; a DTensor as its local shard, placed by its global row offset."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if tensor.dim() == 0:  # a scalar parameter: one row of one element
        tensor = tensor.view(1) if not isinstance(tensor, DTensor) else tensor.to_local().view(1)
        return Local(tensor, 0, None)
    if not isinstance(tensor, DTensor):
        return Local(tensor, 0, None)
    sharded = [dim for dim, placement in enumerate(tensor.placements) if isinstance(placement, Shard)]
    if any(not isinstance(pl, Replicate | Shard) or (isinstance(pl, Shard) and pl.dim != 0)
           for pl in tensor.placements) or len(sharded) > 1:
        raise NotImplementedError(f"adam-mini-paper shards along dim 0 only, not {tensor.placements}")
    _, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    group = tensor.device_mesh.get_group(sharded[0]) if sharded else None
    return Local(tensor.to_local(), offsets[0] if offsets else 0, group)


def _summed(sums: torch.Tensor, group: object | None) -> torch.Tensor:
    """Per-block sums over every rank that holds part of the blocks (a block may span shards)."""
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(sums, group=group)
    return sums


def _row_blocks(segment: Segment, rows: int, offset: int) -> tuple[slice, torch.Tensor] | None:
    """For a segment cut along dim 0: this rank's rows of it (a local slice) and each row's block index."""
    low, high = max(segment.start, offset), min(segment.stop, offset + rows)
    if low >= high:
        return None
    per_block = (segment.stop - segment.start) // segment.blocks
    return slice(low - offset, high - offset), (torch.arange(low, high) - segment.start) // per_block


def block_mean_squares(grad: Local, segment: Segment, global_shape: torch.Size) -> torch.Tensor:
    """mean(g * g) over each block of the segment, over the whole block even where it spans shards."""
    numel = 1
    for dim, size in enumerate(global_shape):
        numel *= (segment.stop - segment.start) if dim == segment.axis else size
    g = grad.tensor
    if segment.axis == 0:
        sums = torch.zeros(segment.blocks, dtype=g.dtype, device=g.device)
        found = _row_blocks(segment, g.shape[0], grad.offset)
        if found is not None:
            rows, blocks = found
            sums.index_add_(0, blocks.to(g.device), g[rows].reshape(blocks.numel(), -1).square().sum(dim=1))
    else:  # cut along another axis: every local row is in the segment
        part = g.narrow(segment.axis, segment.start, segment.stop - segment.start).movedim(segment.axis, 0)
        sums = part.reshape(segment.blocks, -1).square().sum(dim=1)
    return _summed(sums, grad.group) / (numel // segment.blocks)


def apply_block_update(param: Local, m: torch.Tensor, segment: Segment, denom: torch.Tensor, step: float) -> None:
    """param -= step * m / denom, each element divided by its block's denominator."""
    if segment.axis == 0:
        found = _row_blocks(segment, param.tensor.shape[0], param.offset)
        if found is None:
            return
        rows, blocks = found
        scale = denom[blocks.to(denom.device)].reshape(-1, *([1] * (param.tensor.dim() - 1)))
        param.tensor[rows].sub_(m[rows] / scale, alpha=step)
        return
    target = param.tensor.narrow(segment.axis, segment.start, segment.stop - segment.start).movedim(segment.axis, 0)
    moved_m = m.narrow(segment.axis, segment.start, segment.stop - segment.start).movedim(segment.axis, 0)
    per_block = target.shape[0] // segment.blocks
    scale = denom.repeat_interleave(per_block).reshape(-1, *([1] * (target.dim() - 1)))
    target.sub_(moved_m / scale, alpha=step)


class AdamMiniPaper(torch.optim.Optimizer):
    """Adam-mini per the paper's Algorithm 1. State per parameter: `m` (full) and `v` (full or per block)."""

    def __init__(
        self,
        partitioned: Sequence[tuple[torch.Tensor, Partition]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError("lr, eps and weight_decay must be non-negative")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1): {betas}")
        self.partitions: dict[torch.Tensor, Partition] = {p: part for p, part in partitioned}
        params: Iterable[torch.Tensor] = [p for p, _ in partitioned]
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                partition = self.partitions[p]
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # sharded as p is
                    # per block: one value each, the same on every rank (a block may span shards)
                    state["v"] = (torch.zeros_like(p, memory_format=torch.preserve_format) if partition.full
                                  else torch.zeros(partition.num_blocks, dtype=p.dtype, device=p.device))
                state["step"] += 1
                t = state["step"]
                local, grad = local_part(p), local_part(p.grad)
                m = local_part(state["m"]).tensor

                if weight_decay:
                    local.tensor.mul_(1 - lr * weight_decay)
                m.mul_(beta1).add_(grad.tensor, alpha=1 - beta1)
                bias1, bias2 = 1 - beta1**t, 1 - beta2**t
                if partition.full:
                    v = local_part(state["v"]).tensor
                    v.mul_(beta2).addcmul_(grad.tensor, grad.tensor, value=1 - beta2)
                    local.tensor.addcdiv_(m, (v / bias2).add_(eps).sqrt_(), value=-lr / bias1)
                    continue
                offset = 0
                for segment in partition.segments:
                    v_seg = state["v"][offset : offset + segment.blocks]
                    offset += segment.blocks
                    v_seg.mul_(beta2).add_(block_mean_squares(grad, segment, p.shape), alpha=1 - beta2)
                    apply_block_update(local, m, segment, (v_seg / bias2).add_(eps).sqrt_(), lr / bias1)
        return loss
