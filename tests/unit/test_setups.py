"""Training setups (issue 15): LoRA adapters on a frozen base, and parameters frozen by name."""

from __future__ import annotations

import json

import pytest
from support.cli import run

from optprof.config import LoraSpec
from optprof.errors import UsageError
from optprof.model.loading import build_model, load_config, load_model
from optprof.model.setups import parse_lora


def peft_trainable(model: str, r: int) -> tuple[int, int, int]:
    """(trainable, all parameters, adapter tensors) as peft itself counts them on its own wrapper."""
    from peft import LoraConfig, get_peft_model

    config, _, _ = load_config(model)
    wrapped = get_peft_model(build_model(config, device="meta"), LoraConfig(r=r, task_type="CAUSAL_LM"))
    trainable, total = wrapped.get_nb_trainable_parameters()
    return trainable, total, sum(1 for p in wrapped.parameters() if p.requires_grad)


def test_lora_state_on_llama_2_7b_is_adamw_over_the_adapters_only(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(["state-size", "llama-2-7b", "--lora", "r=16", "-o", "adamw", "-f", "json"], capsys)
    assert code == 0
    body = json.loads(out)
    trainable, total, adapter_tensors = peft_trainable("llama-2-7b", 16)
    assert trainable == 8_388_608 and adapter_tensors == 128  # q_proj and v_proj, A and B, in 32 layers
    assert (body["model"]["trainable_params"], body["model"]["params"]) == (trainable, total)
    assert body["model"]["setup"] == "LoRA r=16, alpha 8, dropout 0 on q_proj+v_proj"
    (adamw,) = body["results"]
    assert adamw["state_bytes"] == 8 * trainable + 4 * adapter_tensors  # two fp32 moments + a step counter each
    assert adamw["bytes_per_param"] == pytest.approx(8.0, abs=1e-4)  # per trainable parameter


def test_frozen_parameters_keep_no_state(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(["state-size", "demo", "--freeze", "*embed_tokens*", "--freeze", "lm_head*", "-o", "adamw",
                        "-f", "json"], capsys)
    assert code == 0
    body = json.loads(out)
    whole = load_model("demo").module
    frozen = whole.model.embed_tokens.weight.numel() + whole.lm_head.weight.numel()
    tensors = sum(1 for _ in whole.parameters()) - 2
    assert body["model"]["trainable_params"] == body["model"]["params"] - frozen
    assert body["results"][0]["state_bytes"] == 8 * (body["model"]["params"] - frozen) + 4 * tensors


@pytest.mark.parametrize(("argv", "message"), [
    (["--freeze", "nothing*"], "matches no parameter name"),
    (["--lora", "r=x"], "bad --lora 'r=x'"),
    (["--lora", "alpha=4"], "the rank r is required"),
    (["--lora", "r=4,targets=nope"], "not found in the base model"),
    (["--lora", "r=4", "--qlora", "r=4"], "give one"),
])
def test_bad_setups_get_one_line_and_exit_2(argv: list[str], message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(["state-size", "demo", "-o", "adamw", *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_qlora_state_is_loras_and_its_prediction_is_lower_by_the_nf4_saving(capsys) -> None:  # type: ignore[no-untyped-def]
    from optprof.model.setups import qlora_weight_saving

    rows = []
    for flag in ("--lora", "--qlora"):
        code, out, _ = run(["state-size", "tinyllama-1.1b", flag, "r=8", "-o", "adamw,adam-mini", "-f", "json"], capsys)
        assert code == 0
        rows.append([r["state_bytes"] for r in json.loads(out)["results"]])
    assert rows[0] == rows[1]

    predicted = []
    for flag in ("--lora", "--qlora"):
        code, out, _ = run(["predict", "demo", "--device", "cpu", "--seq-len", "32", flag, "r=8", "-o", "adamw", "-f",
                            "json"], capsys)
        assert code == 0
        body = json.loads(out)
        predicted.append(body["results"][0]["predicted_peak_bytes"])
    assert any(line.startswith("--qlora:") for line in body["assumptions"])  # the derivation is said
    saving = qlora_weight_saving(load_model("demo").module)
    linear = sum(m.weight.numel() for m in load_model("demo").module.model.layers.modules()
                 if type(m).__name__ == "Linear")
    assert 4 * linear - linear // 2 - linear // 32 < saving < 4 * linear - linear // 2  # codes plus scales
    assert predicted[0] - predicted[1] == saving


def test_parse_lora() -> None:
    assert parse_lora("16") == LoraSpec(16)
    assert parse_lora("r=16,alpha=32,dropout=0.05,targets=q_proj+v_proj") == LoraSpec(16, 32, 0.05,
                                                                                        ("q_proj", "v_proj"))
    with pytest.raises(UsageError):
        parse_lora("r=0")


@pytest.mark.parametrize(("argv", "message"), [
    (["--gpus", "2", "--offload-optimizer"], "on CPU ranks both are the same memory"),
    (["--offload-optimizer"], "use --gpus N (N > 1)"),
    (["--gpus", "2", "--strategy", "ddp", "--offload-optimizer"], "use --gpus N (N > 1)"),
])
def test_offloading_where_it_cannot_show_anything_is_refused(argv: list[str], message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(["compare", "demo", "--device", "cpu", "-o", "adamw", *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err
