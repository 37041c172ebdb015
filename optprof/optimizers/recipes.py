"""Model-aware optimizer recipes: one optimizer on the hidden layers' 2-D matrices, another treatment for the
rest (embeddings, output head, norms, biases), configured as their authors' defaults. Each returns an optimizer
marked with its parts (`hybrid.with_parts`), so reports can say what each part holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from optprof.model.info import ModelInfo
from optprof.optimizers.hybrid import Hybrid, OptimizerPart, split_hidden, with_parts

HIDDEN = "hidden-layer 2-D matrices"
REST = "the rest: embeddings, output head, norms, biases"

GALORE_DEFAULT_RANK = 128  # GaLore README's example; --opt-arg rank=N to change it
GALORE_GROUP_DEFAULTS = {"rank": GALORE_DEFAULT_RANK, "update_proj_gap": 200, "scale": 0.25, "projection_type": "std"}

# APOLLO's paper and README: APOLLO rank 256, channel-wise scaling, scale 1; APOLLO-Mini rank 1, one scale per
# tensor, scale 128 (sqrt(128) makes up for the rank-1 estimate); both a random projection renewed every 200 steps.
APOLLO_DEFAULTS = {"rank": 256, "proj": "random", "scale_type": "channel", "scale": 1, "update_proj_gap": 200,
                   "proj_type": "std"}
APOLLO_MINI_DEFAULTS = {**APOLLO_DEFAULTS, "rank": 1, "scale_type": "tensor", "scale": 128}


def _split_args(args: Mapping[str, Any], group_keys: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """--opt-arg values: (the projected group's settings over `group_keys`' defaults, the optimizer's own)."""
    group = {**group_keys, **{k: v for k, v in args.items() if k in group_keys}}
    return group, {k: v for k, v in args.items() if k not in group_keys}


def _parts(hidden: list[nn.Parameter], rest: list[nn.Parameter], hidden_name: str,
           rest_name: str) -> tuple[OptimizerPart, OptimizerPart]:
    return OptimizerPart(hidden_name, HIDDEN, tuple(hidden)), OptimizerPart(rest_name, REST, tuple(rest))


def galore_settings(args: Mapping[str, Any]) -> str:
    return f"rank {args.get('rank', GALORE_DEFAULT_RANK)} on the {HIDDEN}"


def galore(model: nn.Module, info: ModelInfo, args: Mapping[str, Any]) -> torch.optim.Optimizer:
    """GaLore on the hidden matrices; embeddings, output and norms stay Adam."""
    from pytorch_optimizer import GaLore

    projected_args, optimizer_args = _split_args(args, GALORE_GROUP_DEFAULTS)
    hidden, rest = split_hidden(model)
    groups = [group for group in ({"params": rest}, {"params": hidden, **projected_args}) if group["params"]]
    return with_parts(GaLore(groups, **optimizer_args), _parts(hidden, rest, "projected (galore)", "adam"))


def muon(model: nn.Module, info: ModelInfo, args: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The Muon recipe: torch.optim.Muon on the hidden matrices, torch's AdamW on the rest. --opt-arg values go to
    Muon; `adamw_lr` sets AdamW's learning rate."""
    muon_args = {k: v for k, v in args.items() if k != "adamw_lr"}
    adamw_lr = args.get("adamw_lr", 1e-3)
    hidden, rest = split_hidden(model)
    muon_part, adamw_part = _parts(hidden, rest, "muon", "adamw")
    return Hybrid([(muon_part, lambda params: torch.optim.Muon(params, **muon_args)),
                   (adamw_part, lambda params: torch.optim.AdamW(params, lr=adamw_lr))])


def muon_settings(args: Mapping[str, Any]) -> str:
    return f"Muon on the {HIDDEN}, AdamW on the rest"


def muon_family(cls_name: str) -> Any:
    """A pytorch-optimizer Muon variant (NorMuon, AdaMuon) over its two kinds of group: `use_muon` on the hidden
    matrices, its built-in AdamW on the rest."""

    def build(model: nn.Module, info: ModelInfo, args: Mapping[str, Any]) -> torch.optim.Optimizer:
        import pytorch_optimizer

        hidden, rest = split_hidden(model)
        groups = [group for group in ({"params": hidden, "use_muon": True}, {"params": rest, "use_muon": False})
                  if group["params"]]
        optimizer = getattr(pytorch_optimizer, cls_name)(groups, **args)
        return with_parts(optimizer, _parts(hidden, rest, cls_name.lower(), "adamw"))

    return build


def _apollo_class() -> type[torch.optim.Optimizer]:
    """apollo-torch's AdamW, able to step on the meta device: its random projection comes from a
    `torch.Generator` on the gradient's device, and there is no meta generator. On meta the projection is an
    empty tensor of the shape and dtype the library would draw (no values exist there to draw); elsewhere the
    library's own code runs unchanged."""
    from apollo_torch import APOLLOAdamW
    from apollo_torch.random_projector import GradientProjector

    class MetaReadyProjector(GradientProjector):
        def get_orthogonal_matrix(self, weights: torch.Tensor, rank: int, type: str, seed: int) -> torch.Tensor:
            if weights.device.type != "meta":
                return super().get_orthogonal_matrix(weights, rank, type, seed)
            shape = (weights.shape[0], rank) if type == "left" else (rank, weights.shape[1])
            return torch.empty(shape, device="meta", dtype=torch.float32).to(weights.dtype)  # drawn in float32

    class Apollo(APOLLOAdamW):
        def _initialize_projector(self, group: dict[str, Any], state: dict[str, Any]) -> Any:
            if group["proj"] != "random":
                return super()._initialize_projector(group, state)
            return MetaReadyProjector(group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                                      proj_type=group["proj_type"], seed=state["seed"])

    return Apollo


def apollo(defaults: Mapping[str, Any]) -> Any:
    """APOLLO (apollo-torch, the authors' package) on the hidden matrices, its AdamW on the rest."""

    def build(model: nn.Module, info: ModelInfo, args: Mapping[str, Any]) -> torch.optim.Optimizer:
        projected_args, optimizer_args = _split_args(args, defaults)
        hidden, rest = split_hidden(model)
        groups = [group for group in ({"params": rest}, {"params": hidden, **projected_args}) if group["params"]]
        optimizer = _apollo_class()(groups, **{"lr": 1e-3, **optimizer_args})
        return with_parts(optimizer, _parts(hidden, rest, "projected (apollo)", "adamw"))

    return build


def apollo_settings(defaults: Mapping[str, Any]) -> Any:
    def settings(args: Mapping[str, Any]) -> str:
        group, _ = _split_args(args, defaults)
        return (f"rank {group['rank']}, {group['scale_type']}-wise scaling (scale {group['scale']}) on the "
                f"{HIDDEN}")

    return settings
