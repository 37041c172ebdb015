"""Optimizer-state accounting: step a real optimizer over a meta-device model and walk what it keeps.

On the meta device tensors have shapes, dtypes and storage sizes but no data, so a 70B model costs no
memory. Memory layout does not depend on values; the few optimizers that read a value back to Python
(`.item()`, `bool(tensor)`) get a placeholder answer from `PlaceholderScalars`, and the report says so.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from optprof.errors import error_text
from optprof.optimizers.hybrid import parts_of
from optprof.results.rows import StatePart
from optprof.results.vocab import StateMethod

MAX_DEPTH = 6  # how deep to look inside helper objects kept in the state (GaLore's projector: 2)



class PlaceholderScalars(TorchDispatchMode):
    """Answers reads of a value that does not exist (`.item()`, `bool()` on a meta or fake tensor) with a
    neutral placeholder.

    0.5 rather than 0 or 1 for floats, so that expressions like 1 / (1 - x) stay finite (NAdam's
    mu_product); 1 for integers. Bools are True (so `mask.all()` says "no padding"), except where an exact
    equality made them: values are rarely exactly equal, so `x == 0` is False and `x != 0` True (Prodigy
    returns from its step early `if d_de_nom == 0`, which would skip the update and its temporaries).

    Integer reads are counted: a model that reads counts back to Python (an MoE layer's tokens per expert,
    to split its input) gets sizes that are not its own, and a later failure is explained by them.
    """

    EQUALITY = (torch.ops.aten.eq.Scalar, torch.ops.aten.eq.Tensor)
    INEQUALITY = (torch.ops.aten.ne.Scalar, torch.ops.aten.ne.Tensor)

    def __init__(self) -> None:
        super().__init__()
        self.integer_reads = 0
        # id -> (the one-element bool tensor an (in)equality made, what reading it gives); by id with a weak
        # reference to tell a reused id apart (a tensor as a dict key would compare with `==` on lookup)
        self._equalities: dict[int, tuple[weakref.ref[torch.Tensor], bool]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default and _has_no_data(args[0]):
            tensor = args[0]
            if tensor.dtype == torch.bool:
                made, answer = self._equalities.get(id(tensor), (None, True))
                return answer if made is not None and made() is tensor else True
            if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
                return 0.5
            self.integer_reads += 1
            return 1
        out = func(*args, **(kwargs or {}))
        equality = func in self.EQUALITY or func in self.INEQUALITY
        if equality and isinstance(out, torch.Tensor) and out.numel() == 1 and _has_no_data(out):
            self._equalities[id(out)] = (weakref.ref(out), func in self.INEQUALITY)  # `==` reads False, `!=` True
        return out


def _has_no_data(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return tensor.device.type == "meta" or is_fake(tensor)


@contextlib.contextmanager
def eager_compile() -> Iterator[None]:
    """Run torch.compile'd optimizer steps eagerly (torchao compiles one graph per parameter shape)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


# What reading a value of a meta tensor raises (`.item()`, `bool()`, `float()`): the one error that
# PlaceholderScalars answers, so the one a retry under placeholders may fix.
META_VALUE_READ = "Tensor.item() cannot be called on meta tensors"


def is_value_read(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and META_VALUE_READ in str(exc)


def fused_update(optimizer: Any) -> Callable[[Any], None] | None:
    """How an optimizer that updates inside backward (LOMO, AdaLomo: no gradients kept) takes the loss: its
    `fused_backward(loss, lr)` replaces `loss.backward()` and `step()`. None for every other optimizer."""
    method = getattr(optimizer, "fused_backward", None)
    if method is None:
        return None
    return lambda loss: method(loss, optimizer.lr)


GRADIENT_GRAPH_ATTRIBUTE = "optprof_gradient_graph"  # set by builders of optimizers that differentiate gradients


def with_gradient_graph(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Mark an optimizer whose step differentiates the gradients (SophiaH's Hutchinson estimate of the Hessian
    diagonal): backward must keep the gradients' graph (`create_graph=True`), which costs memory."""
    setattr(optimizer, GRADIENT_GRAPH_ATTRIBUTE, True)
    return optimizer


def needs_gradient_graph(optimizer: Any) -> bool:
    return bool(getattr(optimizer, GRADIENT_GRAPH_ATTRIBUTE, False))


def _step(optimizer: torch.optim.Optimizer) -> None:
    """One update over the gradients present, on meta: `step()`; for an optimizer that updates inside backward
    (LOMO) its own end-of-backward update over every gradient still there (what `fused_backward` calls last);
    for one that differentiates the gradients, a Hessian estimate handed in (pytorch-optimizer's `step(hessian=)`,
    zeros of each parameter's shape), since meta gradients have no graph to differentiate."""
    if fused_update(optimizer) is not None:
        optimizer.grad_func(0)  # type: ignore[attr-defined]
    elif needs_gradient_graph(optimizer):
        step: Any = optimizer.step  # SophiaH's step takes the Hessian estimate
        step(hessian=[torch.zeros_like(p) for g in optimizer.param_groups for p in g["params"]])
    else:
        optimizer.step()


def step_on_meta(build: Callable[[], torch.optim.Optimizer]) -> tuple[torch.optim.Optimizer, StateMethod]:
    """Build the optimizer and call step() once so that lazily created state exists.

    A plain step first. Only if it read a value back does a fresh optimizer step again under placeholder
    scalars (the state it creates is the same: shapes and dtypes do not depend on values); any other error
    is the optimizer's own and propagates, so the row's reason is the real one.
    """
    optimizer = build()
    try:
        with eager_compile():
            _step(optimizer)
        return optimizer, StateMethod.META_STEP
    except Exception as exc:
        if not is_value_read(exc):
            raise
        first = exc
    optimizer = build()
    try:
        with eager_compile(), PlaceholderScalars():
            _step(optimizer)
    except Exception as exc:
        raise RuntimeError(f"{error_text(exc)} (on a retry with placeholder scalars; the first step had "
                           f"failed reading a value: {error_text(first)})") from exc
    return optimizer, StateMethod.META_PLACEHOLDERS


@dataclass(frozen=True)
class StateAccount:
    """Bytes an optimizer keeps beyond the parameters and gradients, shared storage counted once."""

    state_bytes: int
    tensors: int  # distinct storages
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    second_moment_entries: int | None = None  # per-element "learning rates"; None if not adaptive
    parts: tuple[StatePart, ...] = ()  # by part, where the optimizer treats parts differently (hybrid.parts_of)


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _is_wrapper_subclass(tensor: torch.Tensor) -> bool:
    """Tensor subclasses that hold inner tensors (torchao's quantized state, DTensor)."""
    return type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__")


def _leaf_tensors(value: Any, depth: int = 0, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every plain tensor inside `value`: containers, tensor subclasses and helper objects' attributes."""
    seen = set() if seen is None else seen
    if id(value) in seen or depth > MAX_DEPTH:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        if _is_wrapper_subclass(value):
            inner_names, _ = cast(Any, value).__tensor_flatten__()  # a wrapper subclass's own protocol
            for name in inner_names:
                inner = getattr(value, name)
                if isinstance(inner, torch.Tensor):  # DTensor also flattens to its DeviceMesh: not state
                    yield from _leaf_tensors(inner, depth + 1, seen)
        else:
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaf_tensors(item, depth + 1, seen)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _leaf_tensors(item, depth + 1, seen)
    elif isinstance(value, nn.Module | torch.optim.Optimizer):
        return  # a reference back to the model or optimizer is not state
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        for item in vars(value).values():
            yield from _leaf_tensors(item, depth + 1, seen)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: ZeroRedundancyOptimizer's inner one (zero1), else itself."""
    inner = getattr(optimizer, "optim", None)
    return inner if type(optimizer).__name__ == "ZeroRedundancyOptimizer" and inner is not None else optimizer


def state_tensors(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One tensor per distinct storage the optimizer keeps (`optimizer.state`, its own attributes and its
    param-group settings), parameters and gradients excluded."""
    optimizer = local_optimizer(optimizer)
    # Parameters and gradients are not state: the model's own, and what the optimizer steps over (which may be
    # views of them, adam-mini's 2-D views of expert tensors); a DTensor by its local shard's storage.
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    owned = [*params, *stepped, *(p.grad for p in [*params, *stepped] if p.grad is not None)]
    excluded = {_storage_key(t) for t in _leaf_tensors(owned)} | {_storage_key(t) for t in owned}

    sources: list[Any] = list(optimizer.state.values())
    sources += [v for k, v in vars(optimizer).items() if k not in ("state", "param_groups", "defaults")]
    sources += [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    found: dict[int, torch.Tensor] = {}
    for source in sources:
        for tensor in _leaf_tensors(source):
            key = _storage_key(tensor)
            if key not in excluded and key not in found:
                found[key] = tensor
    return list(found.values())


def account_state(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], second_moment_keys: frozenset[str]
) -> StateAccount:
    """Add up the distinct storages the optimizer keeps, by dtype."""
    optimizer = local_optimizer(optimizer)
    counted = [(t.untyped_storage().nbytes(), _dtype_name(t.dtype)) for t in state_tensors(optimizer, params)]

    by_dtype: dict[str, int] = {}
    for nbytes, dtype in counted:
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes

    entries: int | None = None
    if second_moment_keys:
        entries = 0
        for per_param in optimizer.state.values():
            for key in second_moment_keys & per_param.keys():
                value = per_param[key]
                if isinstance(value, torch.Tensor):
                    entries += value.numel()  # logical entries, also for quantized subclasses
    return StateAccount(
        state_bytes=sum(nbytes for nbytes, _ in counted),
        tensors=len(counted),
        bytes_by_dtype=dict(sorted(by_dtype.items(), key=lambda kv: -kv[1])),
        second_moment_entries=entries,
        parts=part_accounts(optimizer, params),
    )


def part_accounts(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> tuple[StatePart, ...]:
    """The state kept per parameter of each part the optimizer names (none: ()), counted as account_state
    counts it; state no parameter owns (a buffer in the optimizer itself) belongs to no part."""
    optimizer = local_optimizer(optimizer)
    counted = {_storage_key(t): t for t in state_tensors(optimizer, params)}
    accounts = []
    for part in parts_of(optimizer):
        owned = [optimizer.state[p] for p in part.params if p in optimizer.state]
        keys = {_storage_key(t) for t in _leaf_tensors(owned)}
        accounts.append(StatePart(part.name, part.holds, sum(p.numel() for p in part.params),
                                  sum(counted[k].untyped_storage().nbytes() for k in keys if k in counted)))
    return tuple(accounts)


def logical_state_bytes(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> int:
    """The state's unsharded size: a sharded (DTensor) state tensor counts with its global shape, so FSDP
    ranks report the figure one device would; everything else counts as account_state counts it. (zero1's
    ranks hold whole parameters' state: their logical total is the sum over ranks, which fold_ranks takes.)"""
    optimizer = local_optimizer(optimizer)
    tops = [v for per_param in optimizer.state.values() for v in per_param.values() if isinstance(v, torch.Tensor)]
    sharded = [t for t in tops if hasattr(t, "to_local")]
    inside = {_storage_key(t.to_local()) for t in sharded}
    plain = [t for t in state_tensors(optimizer, params) if _storage_key(t) not in inside]
    return sum(t.numel() * t.element_size() for t in sharded) + sum(t.untyped_storage().nbytes() for t in plain)
