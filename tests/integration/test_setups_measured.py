"""Training setups measured: LoRA on the demo model through compare and predict."""

from __future__ import annotations

import pytest

from optprof.config import CompareConfig, LoraSpec, ModelSelection, PredictConfig, TrainingSettings, TrainingSetup
from optprof.model.loading import load_model


def test_lora_compare_and_predict_on_the_demo_model() -> None:
    """compare's breakdown holds state (and gradients) for the adapters only, and predict's peak equals compare's
    measured CPU tensor peak within 2%."""
    from optprof.commands.compare import run_compare
    from optprof.commands.predict import run_predict

    selection = ModelSelection("demo", setup=TrainingSetup(lora=LoraSpec(8)))
    training = TrainingSettings(device="cpu", micro_batch=2, seq_len=64, steps=2)
    measured = run_compare(CompareConfig(selection, ("adamw", "adam-mini"), training, predict=False))
    trainable = measured.model.trainable_params
    assert trainable is not None and 0 < trainable < measured.model.params / 100
    rows = {row.optimizer: row for row in measured.results}
    assert all(row.status == "ok" for row in rows.values()), [row.reason for row in rows.values()]
    adapter_tensors = 2 * 2 * measured.model.num_layers  # A and B of q_proj and v_proj
    assert rows["adamw"].state_bytes == 8 * trainable + 4 * adapter_tensors
    assert rows["adam-mini"].state_bytes < rows["adamw"].state_bytes
    for row in rows.values():
        assert row.breakdown["optimizer_state"] == row.state_bytes
        assert row.breakdown["gradients"] <= 4 * trainable  # adapters' fp32 gradients at most

    (predicted,) = run_predict(PredictConfig(selection, ("adamw",), training)).results
    assert predicted.status == "ok", predicted.reason
    assert predicted.predicted_peak_bytes == pytest.approx(rows["adamw"].tensor_peak_bytes, rel=0.02)

    # QLoRA: the same adapters and state over a base whose linear layers are 4-bit (about an eighth of fp32)
    quantized = ModelSelection("demo", setup=TrainingSetup(lora=LoraSpec(8), qlora=True))
    (qlora,) = run_compare(CompareConfig(quantized, ("adamw",), training)).results
    assert qlora.status == "ok", qlora.reason
    assert qlora.state_bytes == rows["adamw"].state_bytes
    whole = load_model("demo").module
    linear = sum(m.weight.numel() for m in whole.model.layers.modules() if type(m).__name__ == "Linear")
    saved = rows["adamw"].breakdown["parameters"] - qlora.breakdown["parameters"]
    assert saved == 4 * linear - linear // 2  # fp32 weights gone, NF4's packed codes (half a byte) in their place
    # predicted: the LoRA step lowered by the NF4 saving, scales included (compare's tensor peak has no scales)
    assert qlora.predicted_peak_bytes == pytest.approx(qlora.tensor_peak_bytes, rel=0.02)
