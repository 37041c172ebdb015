"""Optimizers that treat parts of the model differently, as one torch.optim.Optimizer, and what each part holds.

The Muon recipe runs Muon on the hidden layers' 2-D weight matrices and AdamW on everything else (embeddings,
the output head, norms, biases); GaLore and APOLLO project only the hidden matrices. `Hybrid` joins the
optimizers of such a recipe into one (a shared state dict, their param groups side by side), and every such
optimizer carries its `parts`, so that the state can be split by part (`state.part_accounts`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optprof.model.info import embedding_parameters, trainable_parameters

PARTS_ATTRIBUTE = "optprof_parts"  # set on an optimizer whose state splits by part


@dataclass(frozen=True)
class OptimizerPart:
    """A share of the trainable parameters and what updates them, e.g. 'muon' on the hidden matrices."""

    name: str  # short: muon, adamw, projected, full
    holds: str  # what parameters, in words: "hidden-layer 2-D matrices"
    params: tuple[nn.Parameter, ...]


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 2-D weights of the hidden layers: every 2-D parameter but the input embedding and the
    output head (Muon's and GaLore's choice; their rows are tokens, not features)."""
    skip = {id(p) for p in embedding_parameters(model)}
    return [p for p in trainable_parameters(model) if p.dim() == 2 and id(p) not in skip]


def split_hidden(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices, every other trainable parameter), each in the model's order."""
    hidden = hidden_matrices(model)
    hidden_ids = {id(p) for p in hidden}
    return hidden, [p for p in trainable_parameters(model) if id(p) not in hidden_ids]


def with_parts(optimizer: torch.optim.Optimizer, parts: Iterable[OptimizerPart]) -> torch.optim.Optimizer:
    """The optimizer, marked with the parts its state splits into (parts without parameters left out)."""
    setattr(optimizer, PARTS_ATTRIBUTE, tuple(part for part in parts if part.params))
    return optimizer


def parts_of(optimizer: torch.optim.Optimizer) -> tuple[OptimizerPart, ...]:
    return getattr(optimizer, PARTS_ATTRIBUTE, ())


class Hybrid(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped together as one.

    The inner optimizers keep their own step code; they share this optimizer's state dict (keyed by parameter,
    so disjoint) and their param-group dicts are this optimizer's param groups, so that zero_grad, state_dict,
    learning-rate schedulers and optprof's state accounting see one optimizer.
    """

    def __init__(self, parts: list[tuple[OptimizerPart, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]]):
        built = [(part, make(list(part.params))) for part, make in parts if part.params]
        groups = [group for _, inner in built for group in inner.param_groups]
        super().__init__(groups, {})
        self.param_groups = groups  # the very dicts the inner optimizers step with (Optimizer copies them)
        self.inner = tuple(inner for _, inner in built)
        for inner in self.inner:
            self.state.update(inner.state)  # what an inner optimizer set up front (APOLLO: a seed per parameter)
            inner.state = self.state
        with_parts(self, (part for part, _ in built))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self.inner:
            inner.step()
        return loss
