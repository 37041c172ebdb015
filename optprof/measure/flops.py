"""Model FLOPs per token (for MFU) and the dense peak FLOP/s of known GPUs.

MFU = achieved model FLOP/s / device peak. Model FLOPs follow the PaLM paper (appendix B): 6 per matmul
weight per token (forward 2, backward 4) plus 12 · layers · (heads · head_dim) · seq_len for attention
scores and values. Recomputation under gradient checkpointing is not model FLOPs, by that definition.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from optprof.model.info import ModelInfo

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets: (bf16/fp16, fp32).
# fp32 is the plain (non-TF32) rate, which torch uses unless TF32 matmuls are enabled.
# Names are matched as substrings of torch.cuda.get_device_name(), most specific first.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.4, 66.9),
    ("H100 PCIe", 756.0, 51.2),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.4, 66.9),  # SXM
    ("H800", 989.4, 66.9),
    ("GH200", 989.4, 66.9),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("L40", 181.05, 90.5),
    ("L4", 121.0, 30.3),
    ("A10G", 70.0, 31.2),
    ("A10", 125.0, 31.2),
    ("RTX 4090", 165.2, 82.6),
    ("V100", 125.0, 15.7),  # fp16; V100 has no bf16
)


def _words(name: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", name.lower())


def peak_flops(device_name: str, low_precision: bool) -> float | None:
    """The device's dense peak in FLOP/s for bf16/fp16 (`low_precision`) or fp32; None if unknown. A table
    name matches whole words of the device's name in order ("L4" is not "L40", "A10" is not "A100")."""
    words = _words(device_name)
    for pattern, half, single in PEAK_TFLOPS:
        wanted = _words(pattern)
        if any(words[i:i + len(wanted)] == wanted for i in range(len(words))):
            return (half if low_precision else single) * 1e12
    return None


def device_peak_flops(device_name: str, is_cuda: bool, peak_tflops: float | None, low_precision: bool) -> float | None:
    """The peak MFU divides by: the user's --peak-tflops, else the table's for a known CUDA device."""
    if peak_tflops:
        return peak_tflops * 1e12
    return peak_flops(device_name, low_precision) if is_cuda else None


def matmul_weights(module: nn.Module) -> int:
    """Elements of the weights that multiply activations (Linear, GPT-2 Conv1D), a tied output head included.

    Counted per module, so a weight shared by the input embedding and the output head counts once, for the
    head: an embedding lookup is not a matmul.
    """
    from torch import Tensor, nn

    total = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear) or type(sub).__name__ == "Conv1D":
            weight = sub.weight
            total += weight.numel() if isinstance(weight, Tensor) else 0
    return total


def model_flops_per_token(module: nn.Module, info: ModelInfo, seq_len: int) -> float:
    """Forward plus backward FLOPs per trained token.

    Routed experts (3-D weights, not Linear modules) count at the share a token uses: top-k of the experts.
    """
    from optprof.model.info import expert_parameters

    weights = float(matmul_weights(module))
    if info.num_experts and info.experts_per_token:
        experts = [p for p in expert_parameters(module) if p.dim() >= 2]  # biases are no matmul weights
        in_linears = sum(p.numel() for p in experts if p.dim() == 2)  # one Linear per expert: counted in full
        share = info.experts_per_token / info.num_experts
        weights += sum(p.numel() for p in experts) * share - in_linears
    attention = 12 * info.num_layers * (info.num_heads or 0) * (info.head_dim or 0) * seq_len
    return 6.0 * weights + attention
