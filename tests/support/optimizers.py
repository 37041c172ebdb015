"""Optimizers for tests, loaded through optprof's `package.module:ClassName` path."""

import torch


class BrokenOptimizer(torch.optim.SGD):
    """Fails at its first step, as an optimizer that cannot run here would."""

    def __init__(self, params, lr: float = 0.1) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, lr=lr)

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        raise RuntimeError("this optimizer is broken on purpose")


class TwoBuffers(torch.optim.SGD):
    """Keeps two float32 buffers per parameter, one of them stored twice (shared storage)."""

    def __init__(self, params, lr: float = 0.1, scale: float = 1.0) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, lr=lr)
        self.scale = scale

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["a"] = torch.zeros_like(p)
                    state["b"] = torch.zeros_like(p)
                    state["a_again"] = state["a"].view(-1)  # same storage: must count once
                    state["helper"] = _Helper(torch.zeros_like(p))  # inside an object: must count
        return None


class _Helper:
    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer


class Int8State(torch.Tensor):
    """A wrapper tensor subclass holding 1-byte codes and fp32 scales, like torchao's 8-bit state."""

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale: torch.Tensor):  # type: ignore[no-untyped-def]
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32, device=codes.device)

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.codes = codes
        self.scale = scale

    def __tensor_flatten__(self):  # type: ignore[no-untyped-def]
        return ["codes", "scale"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError(f"{func} is not needed by the tests")


class QuantizedMomentum(torch.optim.SGD):
    """One Int8State per parameter: numel bytes of codes and one fp32 scale per 256 elements."""

    BLOCK = 256

    def __init__(self, params, lr: float = 0.1) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, lr=lr)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    codes = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
                    scale = torch.zeros(-(-p.numel() // self.BLOCK), device=p.device)
                    self.state[p]["momentum"] = Int8State(codes, scale)
        return None


class OutOfMemoryOnStep(torch.optim.SGD):
    """Raises the CUDA out-of-memory error at its first step: an injected OOM."""

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by a test)")


class KilledOnStep(torch.optim.SGD):
    """Its process is SIGKILLed at the first real step, as by the kernel's OOM killer, which acts on memory
    really allocated: a step on fake tensors (compare's preflight, in the parent) allocates none and goes on.
    Only ever run it isolated."""

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        import os
        import signal

        from torch._subclasses.fake_tensor import FakeTensor

        if not isinstance(self.param_groups[0]["params"][0], FakeTensor):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().step(closure)


class KilledOnRankOne(torch.optim.SGD):
    """Rank 1's process is SIGKILLed at the first step; rank 0 is left waiting in a collective."""

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        import os
        import signal

        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().step(closure)


class FailsOnceForItsOwnReason(torch.optim.SGD):
    """Its first step fails with an error of its own (not a value read); a second instance would step fine.
    A retry would hide the real reason and report a state that the first instance never had."""

    instances = 0

    def __init__(self, params, lr: float = 0.1) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, lr=lr)
        FailsOnceForItsOwnReason.instances += 1
        self.first = FailsOnceForItsOwnReason.instances == 1

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        if self.first:
            raise ValueError("needs a warm-start checkpoint")
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["buffer"] = torch.zeros_like(p)
        return None


class ReadsAValue(torch.optim.SGD):
    """Reads its gradient norm back to Python, as trust-ratio optimizers do; then keeps one buffer each."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        for group in self.param_groups:
            for p in group["params"]:
                if float(p.grad.norm()) >= 0:  # a value read: on meta it needs a placeholder
                    self.state[p]["buffer"] = torch.zeros_like(p)
        return None


class ReadsAValueThenBreaks(ReadsAValue):
    """Reads a value, and under placeholders fails for a reason of its own."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        super().step(closure)
        raise KeyError("no such group setting")


class CollectiveInStep(torch.optim.SGD):
    """All-reduces inside every step (as adam-mini does), steady on rank 0 and jittery on rank 1: left to
    themselves the ranks would stop repeating the step after different counts and leave one in a collective."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        import random
        import time

        import torch.distributed as dist

        if dist.is_initialized():
            dist.all_reduce(torch.zeros(1))
            if dist.get_rank() == 1:
                time.sleep(random.uniform(0.0, 0.004))  # never precise to 2%: it would repeat until the budget
        return super().step(closure)


class SquareBuffer(torch.optim.SGD):
    """Keeps one buffer of (parameter tensors)^2 elements: state that is not affine in the layer count, which
    state-size must then measure on the whole model."""

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        params = [p for group in self.param_groups for p in group["params"]]
        if "square" not in self.state[params[0]]:
            self.state[params[0]]["square"] = torch.zeros(len(params) ** 2, device=params[0].device)
        return super().step(closure)
