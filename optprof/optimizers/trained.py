"""Which parameters train: those that get a gradient from a forward and backward, not merely those that require one.

Some causal LMs hold parameters their text-only step never uses: fuyu's vision embedding (no image patches),
pegasus's cross-attention in every decoder layer (no encoder states). They require grad, but backward leaves their
`.grad` None, and AdamW (like most optimizers) keeps no state for a parameter without a gradient. optprof's meta
and fake steps made gradients for every parameter directly, and so counted state the real step never holds
(issue 37: fuyu's state 2,444,952 B by state-size, 1,062,032 B measured by compare).

`untrained_parameters` runs one forward and backward on the meta device (no data, no memory: a fraction of a
second for a 7B model) and names the parameters left without a gradient; the steps then give gradients only to the
others. Which parameters train can depend on the sequence's length (deepseek_v4's long-range compressor emits
nothing below 128 tokens, and so trains only above), so the pass runs at the step's length; state-size, which has
none, at 2048 tokens, and says so. Where that pass cannot run on meta (a kernel without a meta implementation),
every parameter that requires grad keeps one, as before, and the reason is returned for the notes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from optprof.errors import error_text

if TYPE_CHECKING:
    from torch import nn

    from optprof.config import ModelSelection

# module names that wrappers insert between a model's own (activation checkpointing, FSDP1, torch.compile)
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")
STATE_SIZE_TOKENS = 2048  # state-size's pass, which has no step length: a usual training sequence


def plain_name(name: str) -> str:
    """A parameter's name as the model itself names it, without what wrappers inserted."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def give_meta_gradients(model: nn.Module, untrained: frozenset[str] = frozenset()) -> None:
    """A gradient for each parameter that requires one, except those backward leaves without one (`untrained`:
    names as `plain_name` gives them), for which optimizers keep no state."""
    import torch

    for name, param in model.named_parameters():
        param.grad = torch.empty_like(param) if param.requires_grad and plain_name(name) not in untrained else None


class TooManyOps(Exception):
    """A pass dispatched more ops than its budget (a model that loops over the tokens in Python)."""


def untrained_parameters(model: nn.Module, tokens: int, op_budget: int | None = None) -> frozenset[str] | str:
    """The names (`plain_name`) of the parameters that require grad but get no gradient from one forward and
    backward of `model` (on the meta device) over one sequence of `tokens` token ids; a str: why the pass could
    not run. With `op_budget`, TooManyOps once the pass has dispatched that many ops. The model's gradients are
    dropped afterwards."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from optprof.optimizers.state import PlaceholderScalars

    class Budget(TorchDispatchMode):
        left = op_budget

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if self.left is not None:
                self.left -= 1
                if self.left < 0:
                    raise TooManyOps(f"more than {op_budget:,} ops")
            return func(*args, **(kwargs or {}))

    trained = {name: param for name, param in model.named_parameters() if param.requires_grad}
    if not trained:
        return frozenset()
    device = next(iter(trained.values())).device
    ids = torch.zeros((1, tokens), dtype=torch.long, device=device)  # token 0: in every vocabulary
    budget = Budget()
    try:
        with PlaceholderScalars(), budget:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return frozenset(plain_name(name) for name, param in trained.items() if param.grad is None)
    except Exception as exc:
        if budget.left is not None and budget.left < 0:
            raise TooManyOps(str(exc)) from exc
        return f"a meta forward and backward failed ({error_text(exc)[:160]})"
    finally:
        for param in model.parameters():
            param.grad = None


SHORT_TOKENS = 32  # the pass where the full length would cost too much: every layer runs
# a whole model's forward and backward dispatches some 150 ops per layer at any length (about 12,000 for 80 layers);
# a model that steps token by token dispatches hundreds per token and layer, and is stopped here (about 1.5 s)
OP_BUDGET = 50_000


def probed(model: nn.Module, tokens: int) -> frozenset[str] | str:
    """`untrained_parameters` at `tokens`, where that is cheap: a pass on meta costs about the same at any length for
    a model that attends to a sequence at once, but a model that steps token by token loops in Python (rwkv's tiny
    config: 0.37 s at 16 tokens, 4.8 s at 256; a full one, minutes). So the pass at `tokens` stops after OP_BUDGET
    ops, and then the pass runs at 32 tokens (a parameter that would train only past 32 tokens would then keep no
    state: none is known among the models that loop)."""
    if tokens <= SHORT_TOKENS:
        return untrained_parameters(model, tokens)
    try:
        return untrained_parameters(model, tokens, OP_BUDGET)
    except TooManyOps:
        return untrained_parameters(model, SHORT_TOKENS)


# per selection and length, once per process (forks inherit it)
_FOUND: dict[tuple[ModelSelection, int], frozenset[str] | str] = {}


def untrained_in(selection: ModelSelection, tokens: int, module: nn.Module | None = None) -> frozenset[str] | str:
    """`untrained_parameters` of the selected model: of `module` (the selection built on meta) where the caller
    has it, else of a meta build made here; once per selection and process (the fake steps' models are built on
    fake tensors, where the pass would cost a step). Where the pass fails in another dtype, it is tried once more in
    bf16: some kernels have meta implementations for bf16 alone (the grouped matmul of deepseek_v4's experts), and
    which parameters get a gradient does not depend on the dtype."""
    import dataclasses

    from optprof.config import Dtype

    key = (selection, tokens)
    if key not in _FOUND:
        found = probed(module, tokens) if module is not None else _built(selection, tokens)
        if isinstance(found, str) and selection.dtype != Dtype.BFLOAT16:
            again = _built(dataclasses.replace(selection, dtype=Dtype.BFLOAT16), tokens)
            found = again if isinstance(again, frozenset) else found
        _FOUND[key] = found
    return _FOUND[key]


def _built(selection: ModelSelection, tokens: int) -> frozenset[str] | str:
    from optprof.model.loading import load_selection

    try:
        module = load_selection(selection).module
    except Exception as exc:
        return f"the model did not build on meta ({error_text(exc)[:160]})"
    return probed(module, tokens)


def names_found(found: frozenset[str] | str) -> frozenset[str]:
    """The names `untrained_in` found; none where its pass could not run (every parameter keeps a gradient)."""
    return found if isinstance(found, frozenset) else frozenset()


def untrained_count(model: nn.Module, untrained: frozenset[str]) -> int:
    """How many parameters (elements, the whole model's under sharding) the `untrained` tensors hold."""
    return sum(param.numel() for name, param in model.named_parameters() if plain_name(name) in untrained)


def untrained_note(untrained: frozenset[str] | str, tokens: int) -> str | None:
    """What the notes say: which parameters get no gradient (and so no state), or why every one was given one."""
    if isinstance(untrained, str):
        return f"every parameter that requires grad was given a gradient: {untrained}"
    if not untrained:
        return None
    names = sorted(untrained)
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (f"{len(names)} parameter tensors require grad but get no gradient from a forward and backward of "
            f"{tokens:,} tokens on meta (32 where the model steps token by token) (so no optimizer state, as in the "
            f"real step): {shown}")
