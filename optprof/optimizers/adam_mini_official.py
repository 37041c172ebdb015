"""The official `adam-mini` package on any transformers causal LM, its update code untouched.

The package (1.1.1) chooses each parameter's update by substrings of its name: "bias" -> Adam; a query or
key name -> one v per head (rows viewed as heads of `head_numel` elements); an embedding, output, value,
attention-output or MLP name -> one v per row ("neuron"); anything else -> one v for the whole tensor.
On architectures whose names mislead it, it crashes: OPT's and Phi's `final_layer_norm` contains "final_layer"
(an output name), Bloom's `word_embeddings_layernorm` contains "embed", so 1-D norm weights reach the per-row
code; mixture-of-experts layers store each projection of all experts as one 3-D tensor, which the per-row
code cannot view.

optprof keeps the package's decisions where they fit the tensor and corrects them from the model itself:
- the input embedding and output layer (found by `get_input_embeddings()` / `get_output_embeddings()`,
  whatever their names) get one v per row;
- a name-matched query or key whose size is not whole heads, and a 1-D tensor sent to per-row code, fall back
  to what fits (per row, or one block);
- a 3-D expert tensor (experts, rows, columns) is handed to the package as a 2-D view (experts x rows,
  columns) sharing its storage: each expert's rows get their own v, as the package treats an MLP's.
It then renames every parameter group to the keyword of the decision, which the package's step matches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from optprof.errors import SetupUnsupported
from optprof.model.info import embedding_weights

# The package's code paths, in the order its step() tries them.
ADAM = "bias"  # per-element v (the package's treatment of biases)
PER_HEAD = "q_proj"  # one v per head of Query / Key
PER_ROW = "mlp"  # one v per row: embedding, output, value, attention output, MLP
WHOLE = "block"  # one v for the tensor (norms and anything unnamed)
ROLE_KEYWORDS = {"embedding": "embd", "output": "output", ADAM: ADAM, PER_HEAD: PER_HEAD, PER_ROW: PER_ROW,
                 WHOLE: WHOLE}


def _contains_any(name: str, keywords: Iterable[str]) -> bool:
    return any(keyword in name for keyword in keywords)


def package_path(optimizer: Any, name: str) -> str:
    """What the package itself would do with a parameter of this (lower-case) name."""
    if _contains_any(name, optimizer.adam_block_names):
        return ADAM
    if _contains_any(name, optimizer.wqk_names):
        return PER_HEAD
    per_row = (optimizer.embd_names | optimizer.output_names | optimizer.wv_names | optimizer.mlp_names
               | optimizer.attn_proj_names)
    return PER_ROW if _contains_any(name, per_row) else WHOLE


def decide(optimizer: Any, name: str, param: torch.Tensor, embedding: torch.Tensor | None,
           output: torch.Tensor | None) -> str:
    """The role of one parameter: the package's path by name, corrected to what fits the tensor. The
    embedding and output layer are known from the model (a tied pair is the embedding)."""
    if param.dim() == 2 and (param is embedding or param is output):
        return "embedding" if param is embedding else "output"
    path = package_path(optimizer, name)
    if path == ADAM:
        return ADAM
    if param.dim() >= 3:
        return PER_ROW  # experts: viewed as (experts x rows, columns) below
    if path == PER_HEAD and (param.dim() != 2 or param.numel() % optimizer.head_numel):
        path = PER_ROW  # not whole heads of head_dim x hidden
    if path == PER_ROW and param.dim() != 2:
        return WHOLE  # a norm weight whose name contains an MLP or output keyword
    return path


def _alias(param: nn.Parameter) -> nn.Parameter:
    """A 2-D parameter over the same storage: (experts x rows, columns)."""
    return nn.Parameter(param.detach().view(-1, param.shape[-1]), requires_grad=param.requires_grad)


def adam_mini_for_model(model: nn.Module, *, hidden_size: int, num_heads: int | None, num_kv_heads: int | None,
                        head_dim: int | None, world_size: int, **args: Any) -> torch.optim.Optimizer:
    """The package's Adam_mini over every trainable parameter of `model`, each group named for its role."""
    from adam_mini import Adam_mini

    if not hidden_size:  # blt: a patcher, an encoder, a decoder and a global transformer, each of its own width
        raise SetupUnsupported("Adam-mini partitions by one hidden size and head count, and this model's config "
                               "has none at its top level (its transformers have sizes of their own)")

    class AdamMiniWithViews(Adam_mini):
        """Adam_mini whose 3-D parameters are 2-D views: their gradients follow before each step."""

        views: list[tuple[nn.Parameter, nn.Parameter]]

        def step(self, closure: Any = None) -> Any:
            for view, original in self.views:
                view.grad = None if original.grad is None else original.grad.view(view.shape)
            return super().step(closure)

        def zero_grad(self, set_to_none: bool = True) -> None:
            super().zero_grad(set_to_none)
            for _, original in self.views:
                original.grad = None if set_to_none or original.grad is None else original.grad.zero_()

    heads = num_heads or 1  # no attention (Mamba): no parameter takes the per-head path
    optimizer = AdamMiniWithViews(model.named_parameters(), dim=hidden_size, n_heads=heads,
                                  n_kv_heads=num_kv_heads or heads, verbose=False, **args)
    optimizer.views = []
    # The package sets head_numel = dim * dim / n_heads, assuming head_dim * heads == hidden; a Query or Key
    # head is head_dim rows of `hidden` inputs (Gemma-style models differ).
    optimizer.head_numel = (head_dim or hidden_size) * hidden_size
    # count_block() only prints, and asserts dim * dim % n_heads == 0, false on such models.
    optimizer.check_block_name = False
    # The package takes its world size from torch.cuda.device_count(): wrong for one process on a host with
    # several GPUs (it would all_gather with no process group) and for ranks on CPU.
    optimizer.world_size = world_size
    embedding, output = embedding_weights(model)
    for index, group in enumerate(optimizer.param_groups):
        (param,) = group["params"]
        role = decide(optimizer, group["name"], param, embedding, output)
        if param.dim() >= 3:
            view = _alias(param)
            optimizer.views.append((view, param))
            group["params"] = [view]
        group["role"] = role
        group["name"] = f"{ROLE_KEYWORDS[role]}.{index}"  # the package's step matches keywords in this name
    return optimizer
