"""MODEL string -> transformers config -> causal LM module (on meta by default) + ModelInfo.

A MODEL is, in the order we look: a config bundled in profiles/models (by name or hub alias), a local
folder holding a config.json, or a hub id whose config (never the weights) is fetched or read from the
local Hugging Face cache. Memory and speed do not depend on weight values, so nothing else is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optprof.config import TrainingSetup
from optprof.errors import UsageError
from optprof.setups import apply_setup, describe_setup

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from optprof.config import ModelSelection

DTYPES = ("float32", "bfloat16", "float16")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # the layer count's name, by family
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    aliases: tuple[str, ...]
    folder: Path


@dataclass(frozen=True)
class ModelInfo:
    """What a report says about the model; all counts are parameters (elements), not bytes."""

    name: str  # what the user typed
    source: str  # "bundled" | "local" | "hub"
    location: str  # folder or hub id the config came from
    architecture: str
    model_type: str
    dtype: str
    params: int  # tied weights counted once
    embedding_params: int  # input embedding + output layer, tied once
    embedding_fraction: float
    tied_embeddings: bool
    hidden_size: int
    num_layers: int
    num_heads: int | None  # None: no attention (a state-space model such as Mamba)
    num_kv_heads: int | None
    head_dim: int | None
    vocab_size: int
    max_position_embeddings: int | None
    # Mixture of experts (None for dense models): routed experts per MoE layer, experts each token uses,
    # and the parameters one token passes through (every expert's share scaled by top-k / experts).
    num_experts: int | None = None
    experts_per_token: int | None = None
    active_params: int | None = None
    trainable_params: int | None = None  # what takes gradients and optimizer state (None in old reports: all)
    setup: str = "full training"  # what trains, in words (setups.describe_setup)

    @property
    def trained_params(self) -> int:
        """The parameters an optimizer steps: the trainable ones (all, in full training)."""
        return self.params if self.trainable_params is None else self.trainable_params


def profiles_dir() -> Path:
    """profiles/ inside an installed wheel, else the checkout's top-level profiles/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "profiles", here.parent / "profiles"):
        if (candidate / "models" / "index.toml").is_file():
            return candidate
    raise UsageError("bundled profiles/ folder not found: reinstall optprof")


@cache
def bundled_models() -> dict[str, BundledModel]:
    models_dir = profiles_dir() / "models"
    index = tomllib.loads((models_dir / "index.toml").read_text())
    return {
        name: BundledModel(name, entry.get("description", ""), tuple(entry.get("aliases", ())), models_dir / name)
        for name, entry in index.items()
    }


def find_bundled(model: str) -> BundledModel | None:
    key = model.strip().lower()
    for bundled in bundled_models().values():
        if key == bundled.name or key in (alias.lower() for alias in bundled.aliases):
            return bundled
    return None


def _unknown_model(model: str, why: str) -> UsageError:
    names = list(bundled_models())
    aliases = [alias for b in bundled_models().values() for alias in b.aliases]
    near = difflib.get_close_matches(model.lower(), names + [a.lower() for a in aliases], n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(near)}?" if near else " `optprof models` lists the bundled configs."
    return UsageError(
        f"unknown model '{model}': it is not a bundled config, not a local folder with a config.json, "
        f"and {why}.{hint}"
    )


def load_config(
    model: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> tuple[PretrainedConfig, str, str]:
    """Resolve MODEL to (config, source, location) without touching any weights."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    bundled = find_bundled(model)
    path = Path(model).expanduser()
    if bundled is not None:
        source, location = "bundled", str(bundled.folder)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"folder '{model}' has no config.json")
        source, location = "local", str(path)
    elif path.suffix == ".json" and path.is_file():
        source, location = "local", str(path)
    elif HUB_ID.match(model):
        source, location = "hub", model
    else:
        raise _unknown_model(model, "it is not a valid Hugging Face hub id")

    try:
        if source == "hub":
            config = _hub_config(location, revision=revision, trust_remote_code=trust_remote_code)
        else:
            config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except OSError as exc:
        if source == "hub":
            raise _unknown_model(
                model, "its config is neither in the local Hugging Face cache nor reachable on the hub (offline?)"
            ) from exc
        raise UsageError(f"cannot read the config of '{model}': {_first_line(exc)}") from exc
    except (ValueError, StrictDataclassError) as exc:  # an unknown model_type, untrusted code, inconsistent sizes
        raise UsageError(f"cannot read the config of '{model}': {_first_line(exc)}") from exc
    return config, source, location


def _hub_config(hub_id: str, *, revision: str | None, trust_remote_code: bool) -> PretrainedConfig:
    """The config from the local cache if it is there, else from the hub when the hub answers at all."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        return AutoConfig.from_pretrained(hub_id, local_files_only=True, **kwargs)
    except OSError:
        if not _hub_reachable():
            raise
    return AutoConfig.from_pretrained(hub_id, **kwargs)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One short connection attempt; huggingface_hub itself retries for ~20 s when offline."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}': choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def build_model(
    config: PretrainedConfig, *, dtype: str = "float32", device: str = "meta", trust_remote_code: bool = False
) -> nn.Module:
    """Build the causal LM from its config. On meta nothing is allocated, so a 70B model takes a second."""
    import torch
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoModelForCausalLM

    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
            )
    except (ValueError, AssertionError, StrictDataclassError) as exc:  # no causal-LM class; or sizes refused
        raise UsageError(f"cannot build a causal LM from this config: {_first_line(exc)}") from exc
    return model


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def _first_attr(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def config_values(config: PretrainedConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of those of `keys` the config (or its text part) has: what `overrides` in load_model sets."""
    found: dict[str, Any] = {}
    for part in (_text_config(config), config):
        found |= {key: getattr(part, key) for key in keys if hasattr(part, key) and key not in found}
    return found


def hidden_size(config: PretrainedConfig) -> int:
    return int(_first_attr(_text_config(config), "hidden_size", "n_embd", "d_model", "embedding_dim", default=0))


def has_attention(model: nn.Module) -> bool:
    """Whether any module is an attention layer (by class name: transformers names them all *Attention*)."""
    return any("attention" in type(module).__name__.lower() for module in model.modules())


def attention_shape(config: PretrainedConfig) -> tuple[int, int, int] | None:
    """(heads, kv_heads, head_dim), or None for a model without attention heads (Mamba, RWKV).

    head_dim need not equal hidden_size / heads (Gemma).
    """
    text = _text_config(config)
    heads = _first_attr(text, "num_attention_heads", "n_head", "num_heads")
    if not heads:
        return None
    heads = int(heads)
    kv_heads = int(_first_attr(text, "num_key_value_heads", "num_kv_heads", "multi_query_group_num", default=heads))
    head_dim = int(_first_attr(text, "head_dim", default=hidden_size(config) // heads))
    latent = (getattr(text, "qk_nope_head_dim", None), getattr(text, "qk_rope_head_dim", None))
    if all(latent):  # multi-head latent attention: a query/key head is its non-rotary plus rotary part
        head_dim = int(latent[0]) + int(latent[1])
    return heads, kv_heads, head_dim


# Config keys for the routed experts of a mixture-of-experts layer, and for how many a token uses.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
EXPERTS_PER_TOKEN_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts")


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routed experts' weights: every parameter under a module named `experts` (shared experts and routers
    are elsewhere), whether stored as one 3-D tensor per projection or as one module per expert."""
    found: dict[int, nn.Parameter] = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] == "experts":
            found |= {id(p): p for p in module.parameters()}
    return list(found.values())


def moe_shape(model: nn.Module, config: PretrainedConfig, params: int) -> tuple[int, int, int] | None:
    """(experts, experts per token, parameters active per token), or None for a dense model. `params`: the
    model's parameter count."""
    experts = expert_parameters(model)
    text = _text_config(config)
    count = _first_attr(text, *EXPERT_COUNT_KEYS)
    top_k = _first_attr(text, *EXPERTS_PER_TOKEN_KEYS)
    if not experts or not count or not top_k:
        return None
    expert_total = sum(p.numel() for p in experts)
    active = params - expert_total + expert_total * int(top_k) // int(count)
    return int(count), int(top_k), active


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a DistributedDataParallel wrapper (FSDP2 keeps the model's class)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def embedding_weights(model: nn.Module) -> tuple[nn.Parameter | None, nn.Parameter | None]:
    """(input embedding weight, output layer weight); the same tensor twice where they are tied."""
    model = unwrapped(model)
    return (getattr(model.get_input_embeddings(), "weight", None),
            getattr(model.get_output_embeddings(), "weight", None))


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Input embedding and output layer weights, a tied pair counted once."""
    found: list[nn.Parameter] = []
    for weight in embedding_weights(model):
        if weight is not None and all(weight is not p for p in found):
            found.append(weight)
    return found


def describe(
    model: nn.Module, config: PretrainedConfig, *, name: str, source: str, location: str, dtype: str
) -> ModelInfo:
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    embeddings = embedding_parameters(model)
    embedding_params = sum(p.numel() for p in embeddings)
    input_emb, output_emb = embedding_weights(model)
    shape = attention_shape(config) if has_attention(model) else None
    heads, kv_heads, head_dim = shape or (None, None, None)
    experts, top_k, active = moe_shape(model, config, params) or (None, None, None)
    text = _text_config(config)
    return ModelInfo(
        name=name,
        source=source,
        location=location,
        architecture=type(model).__name__,
        model_type=str(getattr(config, "model_type", "")),
        dtype=dtype,
        params=params,
        embedding_params=embedding_params,
        embedding_fraction=embedding_params / params if params else 0.0,
        tied_embeddings=input_emb is not None and input_emb is output_emb,
        hidden_size=hidden_size(config),
        num_layers=int(_first_attr(text, *LAYER_COUNT_KEYS, default=0)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(_first_attr(text, "vocab_size", default=0)),
        max_position_embeddings=_first_attr(text, "max_position_embeddings", "n_positions"),
        num_experts=experts,
        experts_per_token=top_k,
        active_params=active,
        trainable_params=sum(p.numel() for p in trainable_parameters(model)),
    )


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module
    config: PretrainedConfig
    info: ModelInfo


def load_model(
    model: str,
    *,
    dtype: str = "float32",
    device: str = "meta",
    revision: str | None = None,
    trust_remote_code: bool = False,
    overrides: dict[str, Any] | None = None,
    layers: int | None = None,
    setup: TrainingSetup | None = None,
) -> LoadedModel:
    """The one call the commands use: resolve, build on `device`, apply the training setup, describe.

    `overrides` set config attributes the config already has (others are ignored), e.g. dropout rates;
    `layers` builds only the first layers (a shallow copy, see `first_layers`); `setup` says what trains
    (LoRA adapters, frozen parameters; default: everything).
    """
    torch_dtype(dtype)  # validate before the slower config lookup
    config, source, location = load_config(model, revision=revision, trust_remote_code=trust_remote_code)
    _apply_overrides(config, (overrides or {}) | (first_layers(config, layers) if layers else {}))
    module = build_model(config, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    setup = setup or TrainingSetup()
    if not setup.is_full:
        module = apply_setup(module, setup)
    info = describe(module, config, name=model, source=source, location=location, dtype=dtype)
    return LoadedModel(module, config, dataclasses.replace(info, setup=describe_setup(setup, module)))


def _apply_overrides(config: PretrainedConfig, overrides: dict[str, Any]) -> None:
    """Set each attribute the config (or its text part) already has; others are ignored."""
    for key, value in overrides.items():
        for part in {id(config): config, id(_text_config(config)): _text_config(config)}.values():
            if hasattr(part, key):
                setattr(part, key, value)


def load_selection(
    selection: ModelSelection, *, dtype: str | None = None, device: str = "meta",
    overrides: dict[str, Any] | None = None, layers: int | None = None,
) -> LoadedModel:
    """`load_model` for what the user selected; `dtype` overrides the selection's (amp's float32 masters)."""
    return load_model(selection.model, dtype=dtype or selection.dtype, device=device, revision=selection.revision,
                      trust_remote_code=selection.trust_remote_code, overrides=overrides, layers=layers,
                      setup=selection.setup)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What an optimizer updates: every parameter that takes a gradient (a tied pair once)."""
    return [p for p in model.parameters() if p.requires_grad]


def _first_line(exc: BaseException) -> str:
    """The message's first line, with the next one where the first only announces it (ends in ':')."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def _layer_count_key(text: PretrainedConfig) -> str | None:
    """The config attribute that holds the layer count (its name varies by family), None if there is none."""
    return next((k for k in LAYER_COUNT_KEYS if isinstance(getattr(text, k, None), int)), None)


def first_layers(config: PretrainedConfig, layers: int) -> dict[str, Any]:
    """Overrides (for `load_model`) that build only the model's first `layers` layers: the layer count, and
    each per-layer list (layer types, per-layer widths) cut to that length."""
    text = _text_config(config)
    key = _layer_count_key(text)
    if key is None:
        raise UsageError("cannot build a shallow copy of this model: its config names no layer count")
    count = getattr(text, key)
    if layers >= count:
        return {}
    per_layer = {name: list(value[:layers]) for name, value in vars(text).items()
                 if isinstance(value, list | tuple) and len(value) == count}
    return {key: layers, **per_layer}


def layer_copies(selection: ModelSelection, info: ModelInfo) -> tuple[tuple[LoadedModel, ...], str | None]:
    """Copies of the model's first 1, 2 and 3 layers (`layers.COPY_LAYERS`), on meta, where they stand for it:
    their parameter counts lie on one line that reaches the model's own at its layer count. Else no copies and
    why not: too few layers to gain, no layer count to set, or layers that differ (a dense prefix before MoE
    layers)."""
    from optprof.layers import COPY_LAYERS, affine_at

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

    text = _text_config(config)
    key = _layer_count_key(text)
    count = getattr(text, key) if key is not None else 1
    whole = _module_kinds(build_model(config, device="meta", trust_remote_code=trust_remote_code))
    lists = [value for value in vars(text).values() if isinstance(value, list | tuple) and len(value) == count]
    at_least = max((_prefix_with_every_value(values) for values in lists), default=1)
    for layers in range(at_least, count):
        shallow = copy.deepcopy(config)
        _apply_overrides(shallow, first_layers(config, layers))
        if _module_kinds(build_model(shallow, device="meta", trust_remote_code=trust_remote_code)) >= whole:
            return layers
    return count


def _prefix_with_every_value(values: list | tuple) -> int:
    """The length of the shortest prefix that holds every distinct value of `values`."""
    names = [str(value) for value in values]
    return max(names.index(name) for name in set(names)) + 1


def _module_kinds(model: nn.Module) -> set[str]:
    return {type(module).__name__ for module in model.modules()}
