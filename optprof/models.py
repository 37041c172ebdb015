"""MODEL string -> transformers config -> causal LM module (on meta by default) + ModelInfo.

A MODEL is, in the order we look: a config bundled in profiles/models (by name or hub alias), a local
folder holding a config.json, or a hub id whose config (never the weights) is fetched or read from the
local Hugging Face cache. Memory and speed do not depend on weight values, so nothing else is loaded.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optprof.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from optprof.config import ModelSelection

DTYPES = ("float32", "bfloat16", "float16")
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
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int | None


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
    except ValueError as exc:  # e.g. an unknown model_type, or remote code not trusted
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
    from transformers import AutoModelForCausalLM

    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
            )
    except (ValueError, AssertionError) as exc:  # no causal-LM class; or torch refusing the config's sizes
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


def attention_shape(config: PretrainedConfig) -> tuple[int, int, int, int]:
    """(hidden_size, heads, kv_heads, head_dim); head_dim need not equal hidden_size / heads (Gemma)."""
    text = _text_config(config)
    hidden = int(_first_attr(text, "hidden_size", "n_embd", "d_model"))
    heads = int(_first_attr(text, "num_attention_heads", "n_head", "num_heads"))
    kv_heads = int(_first_attr(text, "num_key_value_heads", "num_kv_heads", "multi_query_group_num", default=heads))
    head_dim = int(_first_attr(text, "head_dim", default=hidden // heads))
    return hidden, heads, kv_heads, head_dim


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Input embedding and output layer weights, a tied pair counted once."""
    found: list[nn.Parameter] = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = getattr(module, "weight", None)
        if weight is not None and all(weight is not p for p in found):
            found.append(weight)
    return found


def describe(
    model: nn.Module, config: PretrainedConfig, *, name: str, source: str, location: str, dtype: str
) -> ModelInfo:
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    embeddings = embedding_parameters(model)
    embedding_params = sum(p.numel() for p in embeddings)
    input_emb = getattr(model.get_input_embeddings(), "weight", None)
    output_emb = getattr(model.get_output_embeddings(), "weight", None)
    hidden, heads, kv_heads, head_dim = attention_shape(config)
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
        hidden_size=hidden,
        num_layers=int(_first_attr(text, "num_hidden_layers", "n_layer", "num_layers", default=0)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(_first_attr(text, "vocab_size", default=0)),
        max_position_embeddings=_first_attr(text, "max_position_embeddings", "n_positions"),
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
) -> LoadedModel:
    """The one call the commands use: resolve, build on `device`, describe.

    `overrides` set config attributes the config already has (others are ignored), e.g. dropout rates.
    """
    torch_dtype(dtype)  # validate before the slower config lookup
    config, source, location = load_config(model, revision=revision, trust_remote_code=trust_remote_code)
    for key, value in (overrides or {}).items():
        for part in {id(config): config, id(_text_config(config)): _text_config(config)}.values():
            if hasattr(part, key):
                setattr(part, key, value)
    module = build_model(config, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    info = describe(module, config, name=model, source=source, location=location, dtype=dtype)
    return LoadedModel(module, config, info)


def load_selection(
    selection: ModelSelection, *, dtype: str | None = None, device: str = "meta",
    overrides: dict[str, Any] | None = None,
) -> LoadedModel:
    """`load_model` for what the user selected; `dtype` overrides the selection's (amp's float32 masters)."""
    return load_model(selection.model, dtype=dtype or selection.dtype, device=device, revision=selection.revision,
                      trust_remote_code=selection.trust_remote_code, overrides=overrides)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What an optimizer updates: every parameter that takes a gradient (a tied pair once)."""
    return [p for p in model.parameters() if p.requires_grad]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
