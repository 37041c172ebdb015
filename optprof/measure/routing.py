"""The routing a mixture-of-experts model actually did: tokens per expert, per MoE layer.

transformers' experts modules (one per MoE layer, named `experts`) are called as
`experts(hidden_states, top_k_index, top_k_weights)`; a forward pre-hook counts `top_k_index`. The figure
reported is the load imbalance: the busiest expert's tokens over the mean (1.0 = balanced), in the worst
layer. Experts modules called otherwise (Llama 4's, JetMoE's: no top_k_index argument) are not counted.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from torch import nn


class RoutingCounter:
    """Counts the expert choices of every MoE layer while active (`with RoutingCounter(model) as routing`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.counts: dict[str, Any] = {}  # layer name -> tokens per expert, then the sentinels (on the device)
        self._handles: list[Any] = []

    def __enter__(self) -> RoutingCounter:
        for name, module in self.model.named_modules():
            experts = getattr(module, "num_experts", None)
            if name.rpartition(".")[2] == "experts" and isinstance(experts, int):
                self._handles.append(module.register_forward_pre_hook(self._hook(name, experts)))
        return self

    def _hook(self, name: str, experts: int) -> Any:
        import torch

        def count(module: nn.Module, args: tuple[Any, ...]) -> None:
            if len(args) < 2 or not isinstance(args[1], torch.Tensor) or args[1].is_floating_point():
                return
            chosen = args[1].detach().reshape(-1).clamp(max=experts)  # expert-parallel sentinels: one extra bin
            if name not in self.counts:
                self.counts[name] = torch.zeros(experts + 1, dtype=torch.long, device=chosen.device)
            # scatter_add_ on the device, not bincount or a copy: no synchronisation inside a timed step
            self.counts[name].scatter_add_(0, chosen, torch.ones_like(chosen))

        return count

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()

    @property
    def expert_load(self) -> float | None:
        """The busiest expert's tokens over the mean, in the most imbalanced layer; None for a dense model."""
        per_expert = [c[:-1].cpu() for c in self.counts.values()]
        loads = [float(c.max()) / float(c.float().mean()) for c in per_expert if c.sum() > 0]
        return max(loads) if loads else None
