"""The optimizer implementation a step runs (foreach, fused, for-loop): chosen as the target device and the recipe
choose it, and its temporaries held to hand arithmetic."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from optprof.config import DeviceKind, UpdateImpl, implementation_text
from optprof.device.trace import TraceRecorder
from optprof.optimizers.implementation import set_implementation

LAYERS, WIDTH = 4, 64
PARAMETER_BYTES = WIDTH * WIDTH * 4  # one fp32 64 x 64 weight: 16,384 B


def _update_temporaries(impl: UpdateImpl | None, device: DeviceKind, opt_args: dict[str, Any]) -> int:
    """The most bytes the second AdamW update holds beyond parameters, gradients and state (the first step
    creates the state)."""
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)])
    optimizer = torch.optim.AdamW(model.parameters(), **opt_args)
    set_implementation(optimizer, impl, device, opt_args, fake=True)
    model(torch.randn(2, WIDTH)).sum().backward()
    optimizer.step()
    recorder = TraceRecorder()
    with recorder.recording() as trace:
        alive = [*model.parameters(), *(p.grad for p in model.parameters())]
        alive += [t for state in optimizer.state.values() for t in state.values()]
        recorder.tag_tensors(alive, "alive")
        known = len(trace.events)
        optimizer.step()
    sizes: dict[int, int] = {}
    live = peak = 0
    for event in trace.events[known:]:
        if event.alloc:
            sizes[event.id] = event.size
            live += event.size
        else:
            live -= sizes.pop(event.id, 0)
        peak = max(peak, live)
    return peak


def test_foreach_holds_every_parameters_sqrt_at_once_and_the_loop_three_of_one() -> None:
    # torch/optim/adam.py _multi_tensor_adam: exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs), one
    # temporary per parameter, alive together (then divided and added in place): 4 x 16,384 = 65,536 B
    assert _update_temporaries(None, DeviceKind.CUDA, {}) == LAYERS * PARAMETER_BYTES == 65_536
    # _single_tensor_adam: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps) holds the sqrt and the
    # quotient of one parameter at once, while the previous parameter's `denom` lives until the name is rebound:
    # 3 x 16,384 = 49,152 B (parameters of one size)
    assert _update_temporaries(None, DeviceKind.CPU, {}) == 3 * PARAMETER_BYTES == 49_152
    assert _update_temporaries(None, DeviceKind.CUDA, {"foreach": False}) == 3 * PARAMETER_BYTES
    # torch._fused_adamw_ updates in place: no temporaries (step counts are device tensors, made in step one)
    assert _update_temporaries(UpdateImpl.FUSED, DeviceKind.CUDA, {}) == 0
    assert _update_temporaries(UpdateImpl.FOR_LOOP, DeviceKind.CUDA, {}) == 3 * PARAMETER_BYTES


def test_explicit_arguments_win_and_an_explicit_fused_false_is_the_loop() -> None:
    model = torch.nn.Linear(4, 4)
    cases = {"chosen": ({}, True, None), "foreach off": ({"foreach": False}, False, None),
             "fused": ({"fused": True}, None, True),
             # adam.py `adam`: foreach is chosen only when fused and foreach are both None, so fused=False alone
             # runs _single_tensor_adam
             "fused off": ({"fused": False}, None, False)}
    for name, (args, foreach, fused) in cases.items():
        optimizer = torch.optim.AdamW(model.parameters(), **args)
        set_implementation(optimizer, UpdateImpl.FUSED if args else None, DeviceKind.CUDA, args, fake=True)
        group = optimizer.param_groups[0]
        assert (group["foreach"], group["fused"]) == (foreach, fused), name


def test_a_real_cuda_step_is_left_to_torch_and_optimizers_without_the_choice_are_untouched() -> None:
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    set_implementation(optimizer, None, DeviceKind.CUDA, {}, fake=False)
    assert optimizer.param_groups[0]["foreach"] is None  # torch picks foreach itself on CUDA tensors
    adagrad_like = torch.optim.LBFGS(model.parameters())  # takes no foreach argument
    set_implementation(adagrad_like, UpdateImpl.FUSED, DeviceKind.CUDA, {}, fake=True)
    assert "fused" not in adagrad_like.param_groups[0]


@pytest.mark.parametrize(("impl", "device", "args", "text"), [
    (None, DeviceKind.CUDA, {}, "foreach (torch's default on CUDA)"),
    (None, DeviceKind.CPU, {}, "for-loop (torch's default on CPU)"),
    (UpdateImpl.FUSED, DeviceKind.CUDA, {}, "fused (the recipe's)"),
    (UpdateImpl.FUSED, DeviceKind.CUDA, {"foreach": False}, "for-loop (--opt-arg foreach=False)"),
])
def test_the_step_line_names_the_implementation(impl: UpdateImpl | None, device: DeviceKind,
                                                args: dict[str, Any], text: str) -> None:
    assert implementation_text(impl, device, args) == f"torch optimizers' update {text}"


def test_the_recipe_sets_the_update_and_the_report_names_it(capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from support.cli import run

    code, out, _ = run(["predict", "demo", "-o", "adamw", "--device", "cuda", "--seq-len", "32", "--recipe",
                        "torchtitan", "-f", "json"], capsys)
    assert code == 0
    config = json.loads(out)["config"]
    assert config["update_impl"] == "fused" and config["update"] == "torch optimizers' update fused (the recipe's)"
    assert config["step"].endswith(config["update"])
