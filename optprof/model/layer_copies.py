"""Repeated layers: figures measured on copies of a model's first 1, 2 and 3 layers, checked to lie on one
line in the layer count, and extrapolated to the whole model. Exact where they lie on it; the callers step the
whole model where they do not.

Only sums over the parameters (optimizer state) are extrapolated: a step's peak is the largest of several
phases' peaks, each on its own line, and which phase wins can change past the copies (GPT-2's backward peak is
on one line through 4 layers and 2.4% above it at 12), which three copies cannot show.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optprof.errors import UsageError
from optprof.model.info import ModelInfo, text_config
from optprof.model.loading import (
    LoadedModel,
    apply_overrides,
    build_model,
    first_layers,
    layer_count_key,
    load_selection,
)

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

    from optprof.config import ModelSelection


def layer_copies(selection: ModelSelection, info: ModelInfo) -> tuple[tuple[LoadedModel, ...], str | None]:
    """Copies of the model's first 1, 2 and 3 layers (`COPY_LAYERS`), on meta, where they stand for it:
    their parameter counts lie on one line that reaches the model's own at its layer count. Else no copies and
    why not: too few layers to gain, no layer count to set, or layers that differ (a dense prefix before MoE
    layers)."""
    from optprof.model.layer_copies import COPY_LAYERS, affine_at

    if info.num_layers <= COPY_LAYERS[-1]:
        return (), f"{info.num_layers} layers: the whole model is as cheap"
    try:
        copies = tuple(load_selection(selection, layers=n) for n in COPY_LAYERS)
    except UsageError as exc:
        return (), str(exc)
    if affine_at([copy.info.params for copy in copies], info.num_layers) != info.params:
        return (), "its layers differ: copies of its first layers do not add up to it"
    return copies, None


def representative_layers(config: PretrainedConfig, trust_remote_code: bool = False) -> int:
    """The fewest first layers whose copy of the model has every kind of module (by class) and every kind of
    layer (by each per-layer list's values) the whole model has: a dense prefix before the first MoE layer,
    attention every eighth layer of a hybrid, and so on. Built on meta, so each try costs little."""
    import copy

    text = text_config(config)
    key = layer_count_key(text)
    count = getattr(text, key) if key is not None else 1
    whole = _module_kinds(build_model(config, device="meta", trust_remote_code=trust_remote_code))
    lists = [value for value in vars(text).values() if isinstance(value, list | tuple) and len(value) == count]
    at_least = max((_prefix_with_every_value(values) for values in lists), default=1)
    for layers in range(at_least, count):
        shallow = copy.deepcopy(config)
        apply_overrides(shallow, first_layers(config, layers))
        if _module_kinds(build_model(shallow, device="meta", trust_remote_code=trust_remote_code)) >= whole:
            return layers
    return count


def _prefix_with_every_value(values: list | tuple) -> int:
    """The length of the shortest prefix that holds every distinct value of `values`."""
    names = [str(value) for value in values]
    return max(names.index(name) for name in set(names)) + 1


def _module_kinds(model: nn.Module) -> set[str]:
    return {type(module).__name__ for module in model.modules()}

COPY_LAYERS = (1, 2, 3)  # layers of the copies: two fit a line, the third checks it


def affine_at(values: list[int], layers: int) -> int | None:
    """The value at `layers` on the line through `values` at 1, 2 and 3 layers; None when they are not on one."""
    first, second, third = values
    step = second - first
    return first + (layers - 1) * step if third - second == step else None


def affine_dict(values: list[dict[str, int]], layers: int) -> dict[str, int] | None:
    """`affine_at` key by key (a key missing from a copy counts 0); None when any key is off its line."""
    keys = dict.fromkeys(key for value in values for key in value)
    found = {key: affine_at([value.get(key, 0) for value in values], layers) for key in keys}
    if None in found.values():
        return None
    return {key: v for key, v in found.items() if v is not None}


def layer_period(config: PretrainedConfig, trust_remote_code: bool = False, model: Any = None
                 ) -> tuple[int, int] | None:
    """The layer count and the smallest period of the model's layer pattern: the layers' own modules (classes,
    parameter names and shapes) and every per-layer list of the config (layer types, per-layer widths) repeat
    every `period` layers, after a prefix that may differ (a dense first layer before MoE ones). None without a
    layer count or a list of layers to read. Built on meta, unless `model` is a build of it already."""
    text = text_config(config)
    key = layer_count_key(text)
    if key is None:
        return None
    count = getattr(text, key)
    if model is None:
        model = build_model(config, device="meta", trust_remote_code=trust_remote_code)
    import torch

    blocks = next((module for module in model.modules()
                   if isinstance(module, torch.nn.ModuleList) and len(module) == count), None)
    if blocks is None:
        return None
    signatures = [tuple((name, type(sub).__name__) for name, sub in block.named_modules())
                  + tuple((name, tuple(p.shape)) for name, p in block.named_parameters()) for block in blocks]
    lists = [_per_layer(value, count) for value in vars(text).values()
             if isinstance(value, list | tuple) and len(value) == count]
    layers = [(signature, *(str(values[i]) for values in lists)) for i, signature in enumerate(signatures)]
    prefix = 1  # layers before the pattern settles (a dense first layer) are the traces' static part
    for period in range(1, count + 1):
        if all(layers[i] == layers[i + period] for i in range(prefix, count - period)):
            return count, period
    return count, count


def _per_layer(values: list | tuple, count: int) -> list:
    """A config list as one value per layer: a list of layer indices that happens to name every layer
    (llama4's `moe_layers`, lfm2's `full_attn_idxs`) says which layers, not a value per layer."""
    indices = all(isinstance(v, int) and not isinstance(v, bool) for v in values) and \
        list(values) == sorted(set(values)) and all(0 <= v < count for v in values)
    return [i in set(values) for i in range(count)] if indices else list(values)
