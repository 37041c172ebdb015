"""Training setups: which parameters train and how the base is held. LoRA adapters (peft) on a frozen base,
QLoRA's 4-bit NF4 base (bitsandbytes), parameters frozen by name, and transformers' attention implementation.
Applied to the model as built, before any optimizer sees it: a frozen parameter has requires_grad off, so it
takes no gradient and no optimizer state (optimizers are built over `model.info.trainable_parameters`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from optprof.config import LoraSpec, TrainingSetup
from optprof.errors import UsageError
from optprof.model.info import as_transformers

if TYPE_CHECKING:
    from torch import nn

LORA_KEYS = ("r", "alpha", "dropout", "targets")


def parse_lora(text: str) -> LoraSpec:
    """'r=16,alpha=32,dropout=0.05,targets=q_proj+v_proj' (or just '16') -> LoraSpec; one clear error else."""
    example = "e.g. --lora r=16 or --lora r=16,alpha=32,dropout=0.05,targets=q_proj+v_proj"
    values: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        key, sep, value = item.partition("=")
        key, value = (key.strip(), value.strip()) if sep else ("r", key.strip())
        if key not in LORA_KEYS or not value:
            raise UsageError(f"bad --lora '{text}': expected {', '.join(LORA_KEYS)} as key=value ({example})")
        values[key] = value
    try:
        spec = LoraSpec(
            r=int(values["r"]),
            alpha=int(values["alpha"]) if "alpha" in values else None,
            dropout=float(values["dropout"]) if "dropout" in values else None,
            targets=tuple(t for t in values["targets"].split("+") if t) if "targets" in values else None,
        )
    except KeyError:
        raise UsageError(f"bad --lora '{text}': the rank r is required ({example})") from None
    except ValueError as exc:
        raise UsageError(f"bad --lora '{text}': {exc} ({example})") from None
    if spec.r < 1 or (spec.dropout is not None and not 0 <= spec.dropout < 1):
        raise UsageError(f"bad --lora '{text}': r must be at least 1 and dropout in [0, 1)")
    return spec


def describe_setup(setup: TrainingSetup, model: nn.Module | None = None) -> str:
    """In words, for the model line and every CSV row: 'full training', 'LoRA r=16, alpha 16, dropout 0 on
    q_proj+v_proj', ... The LoRA settings are peft's as it resolved them on `model`, defaults included."""
    parts = []
    if setup.lora is not None:
        kind = "QLoRA" if setup.qlora else "LoRA"
        resolved = getattr(model, "peft_config", {}).get("default")
        if resolved is not None:
            targets = "+".join(sorted(resolved.target_modules or ()))
            parts.append(f"{kind} r={resolved.r}, alpha {resolved.lora_alpha}, dropout {resolved.lora_dropout:g} on "
                         f"{targets}")
        else:
            parts.append(f"{kind} r={setup.lora.r}")
        if setup.qlora:
            parts.append("base linear layers in 4-bit NF4 (bitsandbytes, double quantization)")
    if setup.freeze:
        parts.append(f"frozen: {', '.join(setup.freeze)}")
    if setup.attention is not None:
        parts.append(f"{setup.attention} attention")
    return "; ".join(parts) or "full training"


QLORA_PREDICTED = ("--qlora: bitsandbytes' 4-bit weights cannot be fake tensors, so the step ran with the base's "
                   "linear weights unquantized, and each predicted peak is lowered by those weights' bytes less their "
                   "NF4 storage (packed codes and double-quantized scales, measured by quantizing a zero tensor of "
                   "each shape on the CPU); bitsandbytes' dequantization temporaries (one layer's weight at a time) "
                   "are not in it. compare's tensor peak counts the packed codes but not the scales, which are not "
                   "parameters")
QLORA_ON_FAKE = ("bitsandbytes' 4-bit parameters (Params4bit) cannot hold a fake tensor: a model of fake tensors "
                 "keeps its base unquantized (predict lowers its peaks by the NF4 saving instead)")


def apply_setup(model: nn.Module, setup: TrainingSetup) -> nn.Module:
    """The model to train under `setup`: with LoRA, the same transformers model with peft's adapters injected
    (peft's own wrapper is left aside, so every command handles it as any other model), only the adapters
    trainable, and with QLoRA the base's linear layers quantized first; then the --freeze globs switch their
    parameters off."""
    if setup.attention is not None:
        try:
            as_transformers(model).set_attn_implementation(setup.attention)
        except (ValueError, ImportError) as exc:
            raise UsageError(f"--attention {setup.attention}: {str(exc).splitlines()[0]}") from None
    if setup.qlora:
        _quantize_base(model)
    if setup.lora is not None:
        model = _with_lora(model, setup.lora)
    for pattern in setup.freeze:
        matched = [param for name, param in model.named_parameters() if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            example = next(name for name, _ in model.named_parameters())
            raise UsageError(f"--freeze '{pattern}' matches no parameter name (names look like '{example}')")
        for param in matched:
            param.requires_grad_(False)
    return model


@contextlib.contextmanager
def movable_fake_parameters() -> Iterator[None]:
    """torch's `Module.to` / `_apply` cannot move a fake parameter (it swaps tensors, and fake tensors carry weak
    references: "Couldn't swap"). peft moves each new adapter with it, and some models' own `__init__` casts a
    submodule (deepseek_v4's norms, hy_v4's hyper-connections, inkling's convolutions: `.to(dtype=float32)`).
    Inside, `_apply` on a module holding fake tensors replaces each parameter by its converted copy instead (one
    shared copy per parameter); on real tensors it is torch's own."""
    import torch
    from torch import nn
    from torch._subclasses.fake_tensor import is_fake

    original = nn.Module._apply
    converted: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id -> (the original, kept alive; its copy)

    def apply_by_replacing(module: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
        for child in module.children() if recurse else ():
            apply_by_replacing(child, fn)
        for key, param in module._parameters.items():
            if param is not None and id(param) not in converted:
                with torch.no_grad():
                    converted[id(param)] = (param, nn.Parameter(fn(param), requires_grad=param.requires_grad))
            if param is not None:
                module._parameters[key] = converted[id(param)][1]
        for key, buffer in module._buffers.items():
            module._buffers[key] = None if buffer is None else fn(buffer)
        return module

    def apply(module: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
        tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
        if any(is_fake(t) for t in tensors):
            return apply_by_replacing(module, fn, recurse)
        return original(module, fn, recurse)

    nn.Module._apply = apply  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module._apply = original  # type: ignore[method-assign]


def _quantize_base(model: nn.Module) -> None:
    """Every linear layer but the output head as bitsandbytes' Linear4bit: NF4 with double quantization (QLoRA's
    choice), computing in the model's own dtype, quantized where the weights are (CPU or CUDA). On meta nothing
    is quantized (no values): the adapters, their gradients and the optimizer state, all state-size reports, are
    QLoRA's exactly. On fake tensors it cannot be (QLORA_ON_FAKE)."""
    from torch import nn
    from torch._subclasses.fake_tensor import is_fake

    weights = list(model.parameters())
    if any(is_fake(p) for p in weights):
        raise UsageError(f"--qlora: {QLORA_ON_FAKE}")
    if any(p.device.type == "meta" for p in weights):
        return
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise UsageError(f"--qlora needs bitsandbytes ({exc}); pip install -e '.[bnb]' in optprof's checkout") from None
    for name, child in quantized_linears(model):
        weight = child.weight
        layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=weight.dtype, quant_type="nf4", compress_statistics=True,
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)
        if child.bias is not None:
            layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, layer.to(weight.device))  # Params4bit quantizes as it moves


def quantized_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of each layer QLoRA quantizes: every plain linear layer but the output head and LoRA's own
    adapters. `_quantize_base` quantizes these, and `qlora_weight_saving` counts them."""
    from torch import nn

    head = as_transformers(model).get_output_embeddings()
    return [(name, module) for name, module in model.named_modules()
            if type(module) is nn.Linear and module is not head and "lora_" not in name]


def qlora_weight_saving(model: nn.Module) -> int:
    """Bytes the base's linear weights shed when QLoRA holds them in NF4: their own bytes less their 4-bit
    storage (packed codes, double-quantized scales and their constants). The storage is measured, by quantizing
    a zero tensor of each shape and dtype on the CPU with bitsandbytes (outside any fake-tensor mode), once per
    shape: this is how predict sees a 4-bit base that fake tensors cannot hold."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    shapes: dict[tuple[tuple[int, ...], Any], int] = {}
    for _, layer in quantized_linears(model):
        key = (tuple(layer.weight.shape), layer.weight.dtype)
        shapes[key] = shapes.get(key, 0) + 1
    saved = 0
    with unset_fake_temporarily():
        for (shape, dtype), count in shapes.items():
            whole = dtype.itemsize * math.prod(shape)
            saved += count * (whole - _nf4_storage_bytes(shape, dtype))
    return saved


def _nf4_storage_bytes(shape: tuple[int, ...], dtype: Any) -> int:
    import torch
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(torch.zeros(shape, dtype=dtype), quant_type="nf4", compress_statistics=True)
    tensors = [packed, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    return sum(t.untyped_storage().nbytes() for t in tensors if isinstance(t, torch.Tensor))


def _with_lora(model: nn.Module, lora: LoraSpec) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    given: dict[str, Any] = {"r": lora.r}
    given |= {"lora_alpha": lora.alpha} if lora.alpha is not None else {}
    given |= {"lora_dropout": lora.dropout} if lora.dropout is not None else {}
    given |= {"target_modules": list(lora.targets)} if lora.targets else {}
    try:
        with movable_fake_parameters():
            wrapped = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **given))
    except ValueError as exc:  # no default targets for the architecture, or targets that match nothing
        raise UsageError(f"--lora: {str(exc).splitlines()[0]} (name the modules with targets=a+b)") from None
    return cast("nn.Module", wrapped.base_model.model)  # the transformers model, adapters injected in place
