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
