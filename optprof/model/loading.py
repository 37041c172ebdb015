"""MODEL string -> transformers config -> causal LM module (on meta by default).

A MODEL is, in the order we look: a config bundled in profiles/models (by name or hub alias), a local
folder with a config.json, or a Hugging Face hub id (its config only, never weights)."""

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
from optprof.model.info import LAYER_COUNT_KEYS, ModelInfo, describe, text_config
from optprof.model.setups import apply_setup, describe_setup

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


def profiles_dir() -> Path:
    """profiles/ inside an installed wheel, else the checkout's top-level profiles/."""
    package = Path(__file__).resolve().parent.parent  # optprof/, two levels above this module
    for candidate in (package / "profiles", package.parent / "profiles"):
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
        raise _remote_code_error(exc, model) or UsageError(
            f"cannot read the config of '{model}': {_first_line(exc)}") from exc
    except Exception as exc:
        remote = _remote_code_error(exc, model)
        if remote is None:
            raise
        raise remote from exc
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


def default_loaded_dtype(config: PretrainedConfig) -> str:
    """The dtype transformers' from_pretrained gives parameters by default: 'auto', the config's `dtype`; float32
    where the config names none (from_pretrained would take the checkpoint's, which optprof never reads)."""
    named = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    named = named.removeprefix("torch.")
    return named if named in DTYPES else "float32"


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
        raise _remote_code_error(exc, str(config.name_or_path)) or UsageError(
            f"cannot build a causal LM from this config: {_first_line(exc)}") from exc
    except Exception as exc:  # transformers' own code refused the config (an attribute it lacks, ...)
        raise _remote_code_error(exc, str(config.name_or_path)) or UsageError(
            f"transformers cannot build a causal LM from this config: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    return model


REMOTE_MODULES = "transformers_modules"  # where transformers imports a model's own code (--trust-remote-code)


def _remote_code_error(exc: BaseException, model: str) -> UsageError | None:
    """The model's own code (--trust-remote-code) at fault: a UsageError naming its module and the error; None
    when the error did not come from there. Its imports are checked before it runs (transformers'
    dynamic_module_utils.check_imports), which names the missing packages."""
    import traceback

    if isinstance(exc, ImportError) and "requires the following packages" in str(exc):
        return UsageError(f"the model's own code for '{model}' cannot be imported: {_first_line(exc)}")
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if REMOTE_MODULES in frame.filename]
    if not frames:
        return None
    where = frames[-1]
    return UsageError(f"the model's own code for '{model}' failed ({Path(where.filename).name}, line {where.lineno}, "
                      f"in {where.name}): {type(exc).__name__}: {_first_line(exc)}")


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
    apply_overrides(config, (overrides or {}) | (first_layers(config, layers) if layers else {}))
    chosen = _step_defaults(config)
    module = build_model(config, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    setup = setup or TrainingSetup()
    if not setup.is_full:
        module = apply_setup(module, setup)
    info = describe(module, config, name=model, source=source, location=location, dtype=dtype)
    warning = "; ".join(note for note in (info.warning, chosen) if note) or None
    return LoadedModel(module, config, dataclasses.replace(info, setup=describe_setup(setup, module), warning=warning))


def _step_defaults(config: PretrainedConfig) -> str | None:
    """What a token-only step needs set that the config leaves unset, set, and said: X-MOD's language adapter, of
    which each layer holds one per language (all of one shape) and uses one; without a default_language its forward
    fails ("Input language unknown", transformers' own step too)."""
    languages = getattr(config, "languages", None)
    if getattr(config, "model_type", "") != "xmod" or not languages or getattr(config, "default_language", None):
        return None
    config.default_language = next(iter(languages))
    return (f"X-MOD's language adapter is {config.default_language}, the first of its config's languages (it names no "
            "default_language; every language's adapter has the same shape)")


def apply_overrides(config: PretrainedConfig, overrides: dict[str, Any]) -> None:
    """Set each attribute the config (or its text part) already has; others are ignored. A config that refuses a
    key (prophetnet's num_hidden_layers: set the encoder's and decoder's) is the user's one line."""
    for key, value in overrides.items():
        for part in {id(config): config, id(text_config(config)): text_config(config)}.values():
            if hasattr(part, key):
                try:
                    setattr(part, key, value)
                except NotImplementedError as exc:
                    raise UsageError(f"this config does not take {key}: {_first_line(exc)}") from exc


def load_selection(
    selection: ModelSelection, *, dtype: str | None = None, device: str = "meta",
    overrides: dict[str, Any] | None = None, layers: int | None = None,
) -> LoadedModel:
    """`load_model` for what the user selected; `dtype` overrides the selection's (amp's float32 masters)."""
    return load_model(selection.model, dtype=dtype or selection.dtype, device=device, revision=selection.revision,
                      trust_remote_code=selection.trust_remote_code, overrides=overrides, layers=layers,
                      setup=selection.setup)


def _first_line(exc: BaseException) -> str:
    """The message's first line, with the next one where the first only announces it (ends in ':')."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def layer_count_key(text: PretrainedConfig) -> str | None:
    """The config attribute that holds the layer count (its name varies by family), None if there is none."""
    return next((k for k in LAYER_COUNT_KEYS if isinstance(getattr(text, k, None), int)), None)


def first_layers(config: PretrainedConfig, layers: int) -> dict[str, Any]:
    """Overrides (for `load_model`) that build only the model's first `layers` layers: the layer count, and
    each per-layer list (layer types, per-layer widths) cut to that length."""
    text = text_config(config)
    key = layer_count_key(text)
    if key is None:
        raise UsageError("cannot build a shallow copy of this model: its config names no layer count")
    count = getattr(text, key)
    if layers >= count:
        return {}
    per_layer = {name: list(value[:layers]) for name, value in vars(text).items()
                 if isinstance(value, list | tuple) and len(value) == count}
    return {key: layers, **per_layer}
