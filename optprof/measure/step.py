"""The training step every command runs: forward and backward per micro-batch, clipping, optimizer step.

`compare` runs it on a device and times it; `predict` runs the same step on fake tensors. Hooks let a
tracker look in at the start of each forward and at the end of backward without the step knowing why.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optprof.config import TrainingSettings
from optprof.errors import SetupUnsupported
from optprof.measure.device import Device
from optprof.optimizers.state import fused_update, needs_gradient_graph

if TYPE_CHECKING:
    import torch
    from torch import nn

AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
# Repeating the optimizer step for its own timing: at least this many (the first, which may allocate
# temporaries, is dropped), then until the median's 95% interval is within this fraction of it, or the budget.
STEP_REPEATS_MIN = 10
STEP_REPEATS_MAX = 200
STEP_REPEATS_BUDGET_S = 1.0  # seconds of repeated steps per trial (a default compare stays about as long)


@dataclass(frozen=True)
class StepTimes:
    """One optimizer step's phases, in seconds; forward and backward summed over the micro-batches."""

    forward_s: float
    backward_s: float
    clip_s: float
    optimizer_s: float
    total_s: float


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it), so RSS in the timed steps starts from live data."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights count once; a DTensor: its local shard)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def make_batches(vocab_size: int, training: TrainingSettings, torch_device: str, rank: int = 0) -> list[torch.Tensor]:
    """`grad_accum` batches of random token ids, the same for every optimizer (seeded; each rank its own)."""
    import torch

    assert training.seq_len is not None
    tokens = torch.Generator().manual_seed(training.seed + rank)
    shape = (training.micro_batch, training.seq_len)
    return [torch.randint(0, vocab_size, shape, generator=tokens).to(torch_device) for _ in range(training.grad_accum)]


def configure_model(model: nn.Module, training: TrainingSettings) -> None:
    """The step's activation checkpointing and loss, on the model as built (before any sharding)."""
    from optprof.measure.checkpointing import apply_checkpointing
    from optprof.measure.loss import use_chunked_loss

    apply_checkpointing(model, training)
    if training.loss_chunks is not None:
        use_chunked_loss(model, training.loss_chunks)


def _check_fused(training: TrainingSettings) -> None:
    """What an optimizer that updates inside backward cannot do here (a finding: the row is `unsupported`)."""
    import torch.distributed as dist

    why = "it updates each weight inside backward, as soon as its gradient exists (no gradient is kept)"
    if training.grad_accum > 1:
        raise SetupUnsupported(f"{why}, so gradients cannot accumulate over micro-batches: use --grad-accum 1")
    if training.grad_clip is not None:
        raise SetupUnsupported(f"{why}, so --grad-clip cannot clip the whole gradient first (LOMO clips with a "
                               "second backward of its own)")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise SetupUnsupported(f"{why}, before DDP or FSDP reduce gradients across ranks: one device only")


def _second_derivative_step(optimizer: Any) -> None:
    """The step of an optimizer that differentiates the gradients. Where a kernel of the model has no second
    derivative (CPU and CUDA fused attention have none), that is a finding about this setup, not a bug."""
    try:
        optimizer.step()
    except RuntimeError as exc:
        if not ("derivative for" in str(exc) and "not implemented" in str(exc)):
            raise
        raise SetupUnsupported(f"its step differentiates the gradients (a Hessian estimate), and a kernel of the "
                               f"model has no second derivative ({str(exc).splitlines()[0]}); --attention eager "
                               "can run it") from exc


class TrainStep:
    """forward + backward for each micro-batch, gradient clipping, optimizer step + zero_grad: timed by phase."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                 batches: list[torch.Tensor], device: Device, training: TrainingSettings,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        """`scaler`: fp16's loss scaler, when the caller needs its own (predict's never skips a step)."""
        import torch

        from optprof.model.info import needs_more_than_tokens

        refused = needs_more_than_tokens(model)
        if refused is not None:  # a finding about this model, in the row, as for an optimizer that cannot run here
            raise SetupUnsupported(refused)
        self.model = model
        self.optimizer = optimizer
        self.params = params
        self.batches = batches
        self.device = device
        self.training = training
        self.amp_dtype = getattr(torch, AMP_DTYPES[training.amp]) if training.amp else None
        if training.amp == "fp16" and scaler is None:  # fp16 gradients underflow without loss scaling
            scaler = torch.amp.GradScaler(device.type)
        self.scaler = scaler if training.amp == "fp16" else None
        self.losses: list[float] = []
        self.before_forward: Callable[[], None] | None = None  # the tracked step resets MemTracker here
        self.after_backward: Callable[[], None] | None = None  # reads the forward+backward peak
        self.loss: torch.Tensor | None = None  # while after_backward runs: the loss, which the step holds to its end
        self.grad_bytes: int | None = None  # measured when measure_grads is set (untimed steps only)
        self.measure_grads = False
        self.fused = fused_update(optimizer)
        if self.fused is not None:
            _check_fused(training)
        self.create_graph = needs_gradient_graph(optimizer)  # SophiaH: its step differentiates the gradients
        # clip_grad_norm_'s foreach: None lets torch choose by device (CUDA: foreach); a fake step for a CUDA
        # target sets True, since on CPU tensors torch would take the per-tensor path
        self.clip_foreach: bool | None = None

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward(self) -> None:
        """One forward of the first micro-batch, its loss dropped (no backward: a warm-up)."""
        with self._autocast():
            self.model(input_ids=self.batches[0], labels=self.batches[0], use_cache=False)

    def _forward_backward(self) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any]], torch.Tensor]:
        """Each micro-batch's forward and backward: the device marks around each phase, and the loss (read
        only after the step's synchronize: reading it here would stall the host inside the timed step)."""
        device, scaler = self.device, self.scaler
        forward: list[tuple[Any, Any]] = []
        backward: list[tuple[Any, Any]] = []
        loss_sum: torch.Tensor | None = None
        for batch in self.batches:
            if self.before_forward is not None:
                self.before_forward()
            a = device.mark()
            with self._autocast():
                loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss / len(self.batches)
            b = device.mark()
            if self.fused is not None:
                self.fused(loss)  # backward, the update inside it
            else:
                (scaler.scale(loss) if scaler is not None else loss).backward(create_graph=self.create_graph)
            c = device.mark()
            forward.append((a, b))
            backward.append((b, c))
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        assert loss_sum is not None
        return forward, backward, loss_sum

    def _clip_and_step(self) -> tuple[Any, Any, Any]:
        """Clipping, then the optimizer step and zero_grad; the marks at their start and end."""
        import torch

        device, scaler = self.device, self.scaler
        clip_start = device.mark()
        if self.training.grad_clip is not None:
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.training.grad_clip, foreach=self.clip_foreach)
        step_start = device.mark()
        if self.fused is not None:
            pass  # the update ran inside backward
        elif scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        elif self.create_graph:
            _second_derivative_step(self.optimizer)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return clip_start, step_start, device.mark()

    def repeat_optimizer_step(self, precise_enough: Callable[[list[float]], bool]) -> list[float]:
        """Seconds of `optimizer.step()` + zero_grad, repeated on one set of gradients (for timing only: the
        weights and state move on, their sizes do not). One untimed forward and backward makes the gradients;
        each repetition gets them back (untimed) after zero_grad dropped them."""
        import time

        if self.fused is not None or self.create_graph:
            # LOMO has no step of its own (the update runs inside backward, which the backward time holds);
            # SophiaH's step needs a fresh gradient graph, which one set of gradients gives only once
            return []
        self._forward_backward()
        params = list(self.params)
        grads = [p.grad for p in params]
        device, times = self.device, []
        started = time.perf_counter()
        for repetition in range(STEP_REPEATS_MAX + 1):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad
            start = device.mark()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            end = device.mark()
            device.synchronize()
            if repetition:  # the first may allocate what later ones reuse
                times.append(device.seconds(start, end))
            done = len(times) >= STEP_REPEATS_MIN and (
                precise_enough(times) or time.perf_counter() - started > STEP_REPEATS_BUDGET_S)
            if self._all_done(done):
                break
        return times

    def _all_done(self, done: bool) -> bool:
        """Whether every rank is done repeating. A step may hold collectives (adam-mini all-reduces inside
        it), so ranks must stop after the same repetition: one that stopped alone would leave the others
        waiting in a collective it never joins."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return done
        pending = torch.tensor([0 if done else 1], device=self.device.torch_device)
        dist.all_reduce(pending, op=dist.ReduceOp.MAX)
        return int(pending.item()) == 0

    def run(self) -> StepTimes:
        device = self.device
        start = device.mark()
        forward, backward, loss = self._forward_backward()
        if self.measure_grads:
            self.grad_bytes = storage_bytes(p.grad for p in self.params if p.grad is not None)
        if self.after_backward is not None:
            self.loss = loss  # the step holds it past backward: for what runs there to name (a recorder's)
            try:
                self.after_backward()
            finally:
                self.loss = None
        clip_start, step_start, end = self._clip_and_step()
        device.synchronize()
        self.losses.append(float(loss))
        return StepTimes(
            forward_s=sum(device.seconds(x, y) for x, y in forward),
            backward_s=sum(device.seconds(x, y) for x, y in backward),
            clip_s=device.seconds(clip_start, step_start),
            optimizer_s=device.seconds(step_start, end),
            total_s=device.seconds(start, end),
        )
