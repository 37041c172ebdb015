"""One trial of `optprof tune`: the model (seeded weights) trained by one optimizer at one point of its search
space on real text for the run's budget, then its loss on held-out text. Runs in the calling process, which
`optprof.tune` makes a forked single-threaded worker, so the same seed gives the same losses.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optprof.config import DeviceKind, ModelSelection, TrainingSettings, TuneBudget
from optprof.measure.device import CpuDevice
from optprof.measure.step import TrainStep
from optprof.model.info import trainable_parameters
from optprof.model.loading import load_selection
from optprof.optimizers.outcome import status_of
from optprof.optimizers.registry import OptimizerEntry
from optprof.optimizers.state import account_state
from optprof.results.rows import TuneTrial
from optprof.results.vocab import Status
from optprof.tune.space import optimizer_kwargs

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class TuneTrialSpec:
    model: ModelSelection
    entry: OptimizerEntry
    hyperparameters: dict[str, float]
    index: int  # the point's place in the optimizer's sequence
    seed: int
    budget: TuneBudget
    opt_args: dict[str, Any] = field(default_factory=dict)  # fixed; the tuned hyperparameters win over them
    overrides: dict[str, Any] = field(default_factory=dict)  # config attributes, e.g. the byte vocabulary


def training_batches(train: torch.Tensor, budget: TuneBudget, seed: int) -> torch.Tensor:
    """(steps, micro_batch, seq_len) windows of the training text at seeded random places."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, train.numel() - budget.seq_len, (budget.steps, budget.micro_batch), generator=generator)
    offsets = torch.arange(budget.seq_len)
    return train[starts.unsqueeze(-1) + offsets].long()


def held_out_windows(held_out: torch.Tensor, budget: TuneBudget) -> torch.Tensor:
    """eval_sequences windows spread evenly over the held-out text: the same for every trial."""
    import torch

    starts = torch.linspace(0, held_out.numel() - budget.seq_len, budget.eval_sequences).long().clamp(min=0)
    return held_out[starts.unsqueeze(-1) + torch.arange(budget.seq_len)].long()


def held_out_loss(model: nn.Module, windows: torch.Tensor, micro_batch: int) -> float:
    """Mean next-token loss over the windows (nats per token), in batches of `micro_batch`, without dropout."""
    import torch

    model.eval()
    total = 0.0
    with torch.no_grad():
        for chunk in windows.split(micro_batch):
            total += float(model(input_ids=chunk, labels=chunk, use_cache=False).loss) * len(chunk)
    model.train()
    return total / len(windows)


def run_tune_trial(spec: TuneTrialSpec, train: torch.Tensor, held_out: torch.Tensor) -> TuneTrial:
    """The trial's losses; an error becomes its status (unsupported: the optimizer's own code cannot run here)."""
    started = time.perf_counter()
    try:
        return _train(spec, train, held_out, started)
    except Exception as exc:
        status, reason = status_of(exc, spec.entry)
        return TuneTrial(index=spec.index, hyperparameters=spec.hyperparameters, seed=spec.seed, status=status,
                         reason=reason, wall_s=time.perf_counter() - started)


def _train(spec: TuneTrialSpec, train: torch.Tensor, held_out: torch.Tensor, started: float) -> TuneTrial:
    import torch

    budget = spec.budget
    torch.manual_seed(spec.seed)
    loaded = load_selection(spec.model, device="cpu", overrides=spec.overrides)
    model = loaded.module
    model.train()
    optimizer = spec.entry.build(model, loaded.info, {**spec.opt_args, **optimizer_kwargs(spec.hyperparameters)})
    settings = TrainingSettings(device=DeviceKind.CPU, seq_len=budget.seq_len, micro_batch=budget.micro_batch,
                                steps=budget.steps, warmup=0, breakdown=False, time_optimizer_step=False,
                                seed=spec.seed)
    step = TrainStep(model, optimizer, trainable_parameters(model), [], CpuDevice(), settings)
    step_s: list[float] = []
    for batch in training_batches(train, budget, spec.seed):
        step.batches = [batch]
        step_s.append(step.run().total_s)
        if not math.isfinite(step.losses[-1]):
            break
    finite = [loss for loss in step.losses if math.isfinite(loss)]
    blew_up = len(finite) < len(step.losses)
    state_bytes = account_state(step.optimizer, step.params, spec.entry.second_moment_keys).state_bytes
    val_loss = None if blew_up else held_out_loss(model, held_out_windows(held_out, budget), budget.micro_batch)
    if val_loss is not None and not math.isfinite(val_loss):
        val_loss = None
    first = step.losses[0] if step.losses and math.isfinite(step.losses[0]) else None
    diverged = val_loss is None or (first is not None and val_loss > first)
    timed = step_s[1:]  # the first step also allocates the state
    tokens_per_s = budget.micro_batch * budget.seq_len / statistics.median(timed) if timed else None
    return TuneTrial(index=spec.index, hyperparameters=spec.hyperparameters, seed=spec.seed, status=Status.OK,
                     val_loss=val_loss, diverged=diverged, first_loss=first, train_losses=tuple(finite),
                     wall_s=time.perf_counter() - started, tokens_per_s=tokens_per_s, state_bytes=state_bytes)
