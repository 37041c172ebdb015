"""The loss a step computes: the model's own (transformers upcasts the full logits to float32, as torchtitan's
`cross_entropy_loss` does), or torchtune's chunked linear cross-entropy (--loss chunked:N).

The chunked loss follows torchtune's `LinearCrossEntropyLoss` (torchtune/modules/loss/cross_entropy_loss.py @
bd2a0fc): the decoder's final hidden states, flattened; the ignored positions masked out (index_select); N chunks
of tokens (tensor_split), each projected by the head, upcast to float32 and summed by cross-entropy; the sum divided
by the tokens counted. Labels are shifted as torchtune's recipe does (the last position of each sequence ignored),
so the masked positions are known from the shapes alone, and a step on fake tensors computes the same tensors.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

from optprof.errors import SetupUnsupported

if TYPE_CHECKING:
    import torch
    from torch import nn

# Config attributes of models that transform the logits after the head: a loss built from the head alone
# would skip the transform, so the chunked loss refuses them rather than compute another model's loss.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _decoder(model: Any) -> Any:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        raise SetupUnsupported("--loss chunked:N needs the model's decoder apart from its head (transformers' "
                               "get_decoder()), which this model does not give")
    return decoder


def use_chunked_loss(model: Any, chunks: int) -> None:
    """Replace the causal LM's forward (on this instance; FSDP2's hooks on __call__ still run around it) with the
    decoder, then the chunked loss. Its output has the loss only: no full logits are ever made."""
    config = getattr(model, "config", None)
    transforms = [key for key in LOGIT_TRANSFORMS if getattr(config, key, None) not in (None, 1, 1.0)]
    if transforms:
        raise SetupUnsupported(f"the model transforms its logits after the head ({', '.join(transforms)}), which "
                               "a chunked loss built from the head alone would skip")
    decoder = _decoder(model)
    head = model.get_output_embeddings()
    if head is None:
        raise SetupUnsupported("--loss chunked:N needs the model's output head (get_output_embeddings())")

    def forward(self: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> Any:
        hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        return types.SimpleNamespace(loss=chunked_cross_entropy(hidden, labels, head, chunks))

    model.forward = types.MethodType(forward, model)


def chunked_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunks: int) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden` (batch, seq, dim) under `head`, in `chunks` chunks of tokens."""
    import torch
    import torch.nn.functional as F

    batch, seq = labels.shape
    targets = labels[:, 1:].reshape(-1)  # next tokens; each sequence's last position has none (ignored)
    kept = torch.arange(batch * seq, device=hidden.device).view(batch, seq)[:, :-1].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, kept)  # torchtune's mask_inputs
    total = torch.zeros((), device=hidden.device)
    for part, target in zip(flat.tensor_split(chunks, dim=0), targets.tensor_split(chunks, dim=0), strict=True):
        total = total + F.cross_entropy(head(part).float(), target, reduction="sum")
    return total / targets.numel()
