"""Which implementation a torch optimizer's update runs (foreach, fused or the per-tensor for-loop), set the way the
step's device and recipe would set it, and described for the step line.

torch decides inside each optimizer's functional entry point (e.g. torch/optim/adam.py `adam`): with `fused` and
`foreach` both None it calls torch/optim/optimizer.py `_default_to_fused_or_foreach`, which picks foreach when every
tensor is on CUDA (or another foreach-supported device) and the for-loop otherwise; an explicit value is kept, and
an explicit `fused=False` with `foreach` unset runs the for-loop. A fake step runs on CPU tensors, so for a CUDA
target the choice CUDA would make is written into the parameter groups before the first step.
"""

from __future__ import annotations

from typing import Any

from optprof.config import CHOICE_ARGS, DeviceKind, UpdateImpl


def set_implementation(optimizer: Any, impl: UpdateImpl | None, device: DeviceKind, opt_args: dict[str, Any],
                       fake: bool) -> None:
    """Set `impl` (a recipe's) on every group of a torch optimizer that takes `foreach`; `impl` None on a fake step
    for CUDA: foreach, as torch would choose on CUDA tensors. --opt-arg foreach/fused win over both. Optimizers
    without a `foreach` argument (Adam-mini, Muon, ...) keep their own code."""
    if any(key in opt_args for key in CHOICE_ARGS):
        return
    for group in getattr(optimizer, "param_groups", ()):
        if "foreach" not in group:
            continue
        if impl == UpdateImpl.FUSED and "fused" in group:
            group["fused"], group["foreach"] = True, False
        elif impl == UpdateImpl.FOREACH or (impl is None and fake and device == DeviceKind.CUDA
                                            and group["foreach"] is None and group.get("fused") is None):
            group["foreach"] = True
        elif impl == UpdateImpl.FOR_LOOP:
            group["foreach"] = False
