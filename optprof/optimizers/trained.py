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


def untrained_parameters(model: nn.Module, tokens: int) -> frozenset[str] | str:
    """The names (`plain_name`) of the parameters that require grad but get no gradient from one forward and
    backward of `model` (on the meta device) over one sequence of `tokens` token ids; a str: why the pass could
    not run.
    The model's gradients are dropped afterwards."""
    import torch

    from optprof.optimizers.state import PlaceholderScalars

    trained = {name: param for name, param in model.named_parameters() if param.requires_grad}
    if not trained:
        return frozenset()
    device = next(iter(trained.values())).device
    ids = torch.zeros((1, tokens), dtype=torch.long, device=device)  # token 0: in every vocabulary
    try:
        with PlaceholderScalars():
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return frozenset(plain_name(name) for name, param in trained.items() if param.grad is None)
    except Exception as exc:
        return f"a meta forward and backward failed ({error_text(exc)[:160]})"
    finally:
        for param in model.parameters():
            param.grad = None


SHORT_TOKENS = 16  # the first pass: every layer runs
LONG_PASS_BUDGET_S = 2.0  # the pass at the full length, where the short one says it costs no more than this


def probed(model: nn.Module, tokens: int) -> frozenset[str] | str:
    """`untrained_parameters` at `tokens`, where that is cheap: a pass on meta costs the same at any length for a
    model that attends to a sequence at once (0.04 s for a tiny llama at 16 or 256 tokens), but a model that steps
    token by token loops in Python (rwkv's tiny config: 0.37 s at 16 tokens, 4.8 s at 256; a full one, minutes).
    So the pass runs at 16 and 32 tokens first, and at `tokens` only where the cost per token between those two,
    carried to `tokens`, stays within LONG_PASS_BUDGET_S; else the 32-token answer stands (a parameter that would
    train only past 32 tokens would then keep no state: none is known among the models that loop)."""
    import time

    if tokens <= 2 * SHORT_TOKENS:
        return untrained_parameters(model, tokens)
    seconds = []
    for length in (SHORT_TOKENS, 2 * SHORT_TOKENS):
        started = time.perf_counter()
        found = untrained_parameters(model, length)
        seconds.append(time.perf_counter() - started)
    per_token = max(0.0, seconds[1] - seconds[0]) / SHORT_TOKENS  # the first pass also pays one-off costs
    if isinstance(found, frozenset) and seconds[1] + per_token * (tokens - 2 * SHORT_TOKENS) <= LONG_PASS_BUDGET_S:
        found = untrained_parameters(model, tokens)
    return found


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
