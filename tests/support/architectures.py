"""Tiny configs of the decoder families transformers ships, made from their own config classes (nothing is
downloaded), and the sweep that runs them through state-size, predict and compare.

Every family gets the same small sizes where its config has the key; FIXES holds what a family needs beyond
that to build and run (hybrids need an attention layer among two; multi-head latent attention needs as many
key/value heads as heads). A few thousand parameters each: a family's shapes, not its scale.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SMALL: dict[str, Any] = dict(
    hidden_size=32, n_embd=32, d_model=32, embedding_dim=32, intermediate_size=64, ffn_hidden_size=64,
    num_hidden_layers=2, n_layer=2, num_layers=2, num_attention_heads=4, n_head=4, num_heads=4,
    num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=64, n_positions=64,
    rotary_dim=8, kv_channels=8, attention_hidden_size=32,
    # mixture of experts
    moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_local_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
    # multi-head latent attention
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    # state-space and linear-attention layers
    state_size=8, expand=2, conv_kernel=4, time_step_rank=4, mamba_n_heads=4, mamba_d_head=16, mamba_expand=2,
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=32, tie_word_embeddings=False,
)
FIXES: dict[str, dict[str, Any]] = {
    "mamba2": dict(expand=1, n_groups=1),  # heads x head_dim must equal expand x hidden
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "deepseek_v2": dict(num_key_value_heads=4), "deepseek_v3": dict(num_key_value_heads=4),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "bamba": dict(attn_layer_indices=[1]), "granitemoehybrid": dict(layer_types=["mamba", "attention"]),
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8),
    "modernbert-decoder": dict(cls_token_id=1, sep_token_id=2),  # in the tiny vocabulary, as the others are
}
# The 20 and the families people train now: dense, fused QKV, MoE, MLA, hybrids, state-space.
FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "starcoder2", "falcon",
    "gpt2", "opt", "gpt_neox", "bloom", "phi", "phi3", "cohere", "granite", "gptj", "gpt_bigcode", "stablelm",
    "mpt", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "granitemoe", "jetmoe", "gpt_oss",
    "llama4_text", "deepseek_v2", "deepseek_v3", "glm4_moe", "qwen3_next", "jamba", "bamba", "falcon_h1",
    "granitemoehybrid", "nemotron_h", "lfm2", "recurrent_gemma", "mamba", "mamba2", "falcon_mamba", "rwkv",
    "modernbert-decoder",  # its init calls trunc_normal_, which never ended on fake tensors (issue 37)
)
# `make test` runs these through every command (dense, alternating attention, MoE with MLA, hybrid, attention-free,
# and modernbert-decoder's init), within its five minutes; `make families` (OPTPROF_ALL_FAMILIES=1) runs every family
REPRESENTATIVE = ("llama", "gemma3_text", "mixtral", "deepseek_v3", "jamba", "mamba", "modernbert-decoder")
ALL_FAMILIES = bool(os.environ.get("OPTPROF_ALL_FAMILIES"))
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "granitemoe", "jetmoe", "gpt_oss", "llama4_text",
       "deepseek_v2", "deepseek_v3", "glm4_moe", "qwen3_next", "jamba", "granitemoehybrid", "nemotron_h")
NO_ATTENTION = ("mamba", "mamba2", "falcon_mamba", "rwkv")


def tiny_config(model_type: str) -> Any:
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = AutoConfig.for_model(model_type)
        text = default.get_text_config()
        known = {k: v for k, v in SMALL.items() if any(
            hasattr(part, k) and not isinstance(getattr(type(part), k, None), property) for part in (default, text))}
        return AutoConfig.for_model(model_type, **{**known, **FIXES.get(model_type, {})})


def write_tiny(model_type: str, folder: Path) -> str:
    """The family's tiny config.json in `folder`/<type>: a MODEL argument for every command."""
    target = folder / model_type
    target.mkdir(parents=True, exist_ok=True)
    tiny_config(model_type).to_json_file(target / "config.json")
    return str(target)


@dataclass
class Sweep:
    """One family through the three commands: status and reason per command and optimizer, and the
    predicted peak's error against compare's measured tensor peak."""

    family: str
    statuses: dict[tuple[str, str], tuple[str, str | None]] = field(default_factory=dict)
    prediction_error: dict[str, float] = field(default_factory=dict)  # predicted / measured - 1
    expert_load: dict[str, float | None] = field(default_factory=dict)  # compare's routing seen
    # predict's figures for these optimizers from the step shared by all (differences named), against their own
    shared_differs: dict[str, list[str]] = field(default_factory=dict)


OWN_STEP = ("adamw",)  # predicted again by its own fake model and steps (issue 28's lever 1)
# compare measures these of the optimizers asked (real steps are the sweep's cost; every optimizer's real step is
# covered by the compare tests on the demo model): AdamW's and both Adam-minis' peaks against their predictions
COMPARED = ("adamw", "adam-mini", "adam-mini-paper")


def sweep(model_type: str, folder: Path, optimizers: tuple[str, ...], seq_len: int = 16) -> Sweep:
    import dataclasses

    from optprof.commands.compare import run_compare
    from optprof.commands.predict import predict_optimizer, run_predict
    from optprof.commands.state_size import run_state_size
    from optprof.config import CompareConfig, ModelSelection, PredictConfig, StateSizeConfig, TrainingSettings
    from optprof.optimizers.registry import REGISTRY

    selection = ModelSelection(write_tiny(model_type, folder))
    training = TrainingSettings(device="cpu", seq_len=seq_len, steps=2, warmup=2, sample_interval_s=0.01,
                                time_optimizer_step=False)
    result = Sweep(model_type)
    state = run_state_size(StateSizeConfig(selection, optimizers))
    predicted = run_predict(PredictConfig(selection, optimizers, training))
    # predict runs once above; compare's preflight would predict each row again (tested in test_preflight)
    compared = tuple(name for name in optimizers if name in COMPARED) or optimizers
    measured = run_compare(CompareConfig(selection, compared, training, predict=False, preflight=False),
                           isolate=False)
    for command, report in (("state-size", state), ("predict", predicted), ("compare", measured)):
        for row in report.results:
            result.statuses[(command, row.optimizer)] = (row.status, row.reason)
    peaks = {row.optimizer: row.tensor_peak_bytes for row in measured.results if row.status == "ok"}
    result.expert_load = {row.optimizer: row.expert_load for row in measured.results}
    for row in predicted.results:
        if row.optimizer in OWN_STEP:
            own = predict_optimizer(PredictConfig(selection, (row.optimizer,), training), REGISTRY[row.optimizer],
                                    training, lambda text: None)
            result.shared_differs[row.optimizer] = [
                key for key, value in dataclasses.asdict(row).items()
                if key != "predict_s" and value != getattr(own, key)]
        if row.status == "ok" and peaks.get(row.optimizer):
            result.prediction_error[row.optimizer] = row.predicted_peak_bytes / peaks[row.optimizer] - 1
    return result
