"""What a built model is: ModelInfo (parameters, embedding share, shape), and the parameters optprof asks
about (trainable, embedding, expert)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # the layer count's name, by family


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
    # an encoder built as a causal LM without `is_decoder`: its attention sees future tokens (`bidirectional`)
    warning: str | None = None

    @property
    def trained_params(self) -> int:
        """The parameters an optimizer steps: the trainable ones (all, in full training)."""
        return self.params if self.trainable_params is None else self.trainable_params


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def _first_attr(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = _attr(config, name)
        if value is not None:
            return value
    return default


def _attr(config: Any, name: str) -> Any:
    """config.name, or None; on a heterogeneous config (transformers' per-layer attributes: gemma4's head_dim), an
    attribute that varies by layer reads as most of its layers have it (`per_layer_differences` says so)."""
    try:
        return getattr(config, name, None)
    except Exception as exc:  # AmbiguousGlobalPerLayerAttributeError (transformers >= 5.x), by name: older lack it
        if type(exc).__name__ != "AmbiguousGlobalPerLayerAttributeError":
            raise
        values = _per_layer(config, name)
        return Counter(values).most_common(1)[0][0] if values else None


def _per_layer(config: Any, name: str) -> list[Any]:
    view = getattr(config, "per_layer_config", None)
    layers = getattr(config, "num_hidden_layers", None)
    if view is None or not isinstance(layers, int):
        return []
    return [getattr(view[index], name, None) for index in range(layers)]


def per_layer_differences(config: PretrainedConfig) -> str | None:
    """The attributes a heterogeneous config sets per layer that differ between its layers, in words, or None."""
    text = text_config(config)
    names = sorted(getattr(text, "per_layer_attributes", None) or ())
    differ = {name: sorted(set(values), key=str) for name in names if len(set(values := _per_layer(text, name))) > 1}
    if not differ:
        return None
    listed = ", ".join(f"{name} {' / '.join(map(str, values))}" for name, values in differ.items())
    return (f"per-layer sizes differ ({listed}): the shape shown, Adam-mini's head blocks and the MFU's attention "
            "term take the value most layers have")


def _context_length(config: Any) -> int | None:
    """The positions the model can take; None when it has no bound (xlnet says -1: relative positions, no table)."""
    length = _first_attr(config, "max_position_embeddings", "n_positions")
    return length if isinstance(length, int) and length > 0 else None


def config_values(config: PretrainedConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of those of `keys` the config (or its text part) has: what `overrides` in load_model sets."""
    found: dict[str, Any] = {}
    for part in (text_config(config), config):
        found |= {key: getattr(part, key) for key in keys if hasattr(part, key) and key not in found}
    return found


def hidden_size(config: PretrainedConfig) -> int:
    return int(_first_attr(text_config(config), "hidden_size", "n_embd", "d_model", "embedding_dim", default=0))


def has_attention(model: nn.Module) -> bool:
    """Whether any module is an attention layer (by class name: transformers names them all *Attention*)."""
    return any("attention" in type(module).__name__.lower() for module in model.modules())


def attention_shape(config: PretrainedConfig) -> tuple[int, int, int] | None:
    """(heads, kv_heads, head_dim), or None for a model without attention heads (Mamba, RWKV).

    head_dim need not equal hidden_size / heads (Gemma).
    """
    text = text_config(config)
    heads = _first_attr(text, "num_attention_heads", "n_head", "num_heads")
    if not heads:
        return None
    heads = int(heads)
    kv_heads = int(_first_attr(text, "num_key_value_heads", "num_kv_heads", "multi_query_group_num", default=heads))
    head_dim = int(_first_attr(text, "head_dim", default=hidden_size(config) // heads))
    nope, rope = _attr(text, "qk_nope_head_dim"), _attr(text, "qk_rope_head_dim")
    if nope and rope:  # multi-head latent attention: a query/key head is its non-rotary plus rotary part
        head_dim = int(nope) + int(rope)
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
    text = text_config(config)
    count = _first_attr(text, *EXPERT_COUNT_KEYS)
    top_k = _first_attr(text, *EXPERTS_PER_TOKEN_KEYS)
    if not experts or not count or not top_k:
        return None
    expert_total = sum(p.numel() for p in experts)
    active = params - expert_total + expert_total * int(top_k) // int(count)
    return int(count), int(top_k), active


def as_transformers(model: nn.Module) -> PreTrainedModel:
    """The module as the transformers model it is (every model optprof builds is one): its own methods, typed."""
    return cast("PreTrainedModel", model)


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a DistributedDataParallel wrapper (FSDP2 keeps the model's class)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def embedding_weights(model: nn.Module) -> tuple[nn.Parameter | None, nn.Parameter | None]:
    """(input embedding weight, output layer weight); the same tensor twice where they are tied."""
    model = as_transformers(unwrapped(model))
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
    text = text_config(config)
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
        max_position_embeddings=_context_length(text),
        num_experts=experts,
        experts_per_token=top_k,
        active_params=active,
        trainable_params=sum(p.numel() for p in trainable_parameters(model)),
        warning="; ".join(note for note in (BIDIRECTIONAL if bidirectional(model, config) else None,
                                            per_layer_differences(config)) if note) or None,
    )


# Models whose training step needs inputs besides token ids, which optprof does not make: the reason, per model type
NEEDS_MORE_THAN_TOKENS = {
    "git": "GIT is an image-to-text model: its loss starts after the image tokens it expects first, so a step on text "
           "alone has nothing to predict (transformers' own step fails the same way); it needs pixel_values, which "
           "optprof does not make",
    **dict.fromkeys(("gemma4_assistant", "gemma4_unified_assistant"),
                    "a Gemma 4 drafter: its forward takes the target model's embeddings and shared key/value states "
                    "(inputs_embeds, shared_kv_states), not token ids (transformers' own step fails the same way); "
                    "optprof does not make them"),
}


def needs_more_than_tokens(model: nn.Module) -> str | None:
    """Why `model`'s step cannot run on token ids alone (`NEEDS_MORE_THAN_TOKENS`), or None."""
    config = getattr(model, "config", None)
    return NEEDS_MORE_THAN_TOKENS.get(str(getattr(config, "model_type", "")))


BIDIRECTIONAL = ("an encoder (BERT-style) built as a causal LM with is_decoder false: its attention sees every token, "
                 "future ones included, so this is not a causal LM's step (its loss falls to near nothing); set "
                 '"is_decoder": true in its config.json to profile it as a decoder')


def bidirectional(model: nn.Module, config: PretrainedConfig) -> bool:
    """Whether `model` is one of transformers' encoders with a causal-LM head (BERT, RoBERTa, RoFormer, ELECTRA and
    their kin: each `*ForCausalLM.__init__` warns "add `is_decoder=True`" and reads `config.is_decoder`), built
    without `is_decoder`, so that nothing masks future tokens (issue 37: roformer's loss fell from 6.35 to 1.27)."""
    import inspect

    if getattr(config, "is_decoder", True):
        return False
    try:
        source = inspect.getsource(type(model).__init__)
    except (OSError, TypeError):  # built in C or from a string: no source to read
        return False
    return "is_decoder" in source


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What an optimizer updates: every parameter that takes a gradient (a tied pair once)."""
    return [p for p in model.parameters() if p.requires_grad]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules whose class the model's `_no_split_modules` names (its transformer blocks), in order:
    the units FSDP2 shards one by one and activation checkpointing wraps."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks: list[nn.Module] = []
    inside: list[str] = []  # the blocks' own names: a named class nested in a block is part of it (mamba names its
    # MambaMixer beside MambaBlock; FSDP2 cannot shard a block's parameters twice, and a block checkpointed inside
    # another would be recomputed twice)
    for name, module in model.named_modules():
        # FSDP2 renames a sharded module's class FSDP<name> (torch/distributed/fsdp/_fully_shard/_fully_shard.py,
        # fully_shard): plan checkpoints copies sharded and warmed up once for all its setups
        kind = type(module).__name__
        kind = kind if kind in names else kind.removeprefix("FSDP")
        if kind in names and not any(name.startswith(outer + ".") for outer in inside):
            blocks.append(module)
            inside.append(name)
    return blocks
