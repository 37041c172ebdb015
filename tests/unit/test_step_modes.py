"""The step people run: --mp-policy, --activation-checkpointing, --loss and --recipe, on fake tensors (predict),
for a dense, an MoE and a hybrid family; the selective-op rule on one block; flag resolution and bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support.architectures import write_tiny
from support.cli import run

from optprof.commands.fake_step import FakeTrainer
from optprof.config import (
    Amp,
    Checkpointing,
    Dtype,
    FsdpUnits,
    ModelSelection,
    Precision,
    PredictConfig,
    Strategy,
    TrainingSettings,
    parse_checkpointing,
    parse_loss,
    parse_mp_policy,
    step_precision,
)
from optprof.distributed.sharding import fake_process_group, fake_tensors
from optprof.errors import UsageError
from optprof.optimizers.registry import resolve_optimizers
from optprof.trainers import RECIPES, step_choice

MODES = [(Checkpointing.NONE, 1), (Checkpointing.FULL, 1), (Checkpointing.SELECTIVE_OP, 1),
         (Checkpointing.SELECTIVE_LAYER, 2)]
FAMILIES = ("llama", "mixtral", "lfm2")  # dense; mixture of experts; hybrid (short convolutions + attention)


def fwd_bwd_peaks(model: str, training: TrainingSettings, gpus: int = 1) -> tuple[int, int]:
    """(forward+backward peak, state bytes) of adamw's fake step; FSDP2 over `gpus` fake ranks when sharded or
    under a policy."""
    config = PredictConfig(ModelSelection(model), ("adamw",), training, gpus=gpus)
    entry = resolve_optimizers(["adamw"])[0]
    sharded = gpus > 1 or training.mp_param is not None
    with (fake_process_group(gpus) if sharded else contextlib.nullcontext()) as mesh, fake_tensors():
        trainer = FakeTrainer(config, entry, training, mesh)
        peak = trainer.peak(training.micro_batch)
    return peak.fwd_bwd_peak_bytes, trainer.state_bytes


@pytest.mark.parametrize("family", FAMILIES)
def test_every_checkpointing_mode_runs_and_saves_what_it_should(family: str, tmp_path: Path) -> None:
    model = write_tiny(family, tmp_path)
    base = TrainingSettings(device="cpu", seq_len=64, micro_batch=4)
    peaks = {}
    for mode, every in MODES:
        peak, state = fwd_bwd_peaks(model, dataclasses.replace(base, checkpointing=mode, checkpoint_every=every))
        peaks[mode] = (peak, state)
    states = {state for _, state in peaks.values()}
    assert len(states) == 1  # checkpointing never touches the optimizer's state
    none, full = peaks[Checkpointing.NONE][0], peaks[Checkpointing.FULL][0]
    assert full < none
    assert full < peaks[Checkpointing.SELECTIVE_OP][0] < none  # saves some outputs, recomputes the rest
    # block 2 of 2 checkpointed: its backward, which comes first, recomputes what it did not keep
    assert full <= peaks[Checkpointing.SELECTIVE_LAYER][0] <= none * 1.001


def test_a_mamba_hybrid_runs_every_mode(tmp_path: Path) -> None:
    """jamba (mamba + attention + experts): its peak is inside the mamba reference scan's temporaries, which no
    checkpointing lowers, so only that every mode runs and leaves the state alone is asserted here."""
    model = write_tiny("jamba", tmp_path)
    base = TrainingSettings(device="cpu", seq_len=16, micro_batch=1)
    states = {fwd_bwd_peaks(model, dataclasses.replace(base, checkpointing=mode, checkpoint_every=every))[1]
              for mode, every in MODES}
    assert len(states) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_the_policy_and_the_chunked_loss_run_on_every_family(family: str, tmp_path: Path) -> None:
    model = write_tiny(family, tmp_path)
    base = TrainingSettings(device="cpu", seq_len=64, micro_batch=4)
    plain, state = fwd_bwd_peaks(model, base)
    policy, policy_state = fwd_bwd_peaks(
        model, dataclasses.replace(base, mp_param=Precision.BF16, mp_reduce=Precision.FP32), gpus=2)
    assert policy_state == pytest.approx(state / 2, rel=0.05)  # fp32 shards: half the state per rank
    assert policy < plain  # bf16 activations
    chunked, chunked_state = fwd_bwd_peaks(model, dataclasses.replace(base, loss_chunks=4))
    assert chunked_state == state
    assert chunked > 0


def test_the_chunked_loss_equals_the_models_own_loss(model_dir: Callable[[str], str]) -> None:
    from optprof.measure.loss import use_chunked_loss
    from optprof.model.loading import load_model

    module = load_model(model_dir("tiny-llama"), device="cpu").module
    tokens = torch.randint(0, 128, (2, 16))
    expected = module(input_ids=tokens, labels=tokens).loss
    use_chunked_loss(module, 3)
    assert module(input_ids=tokens, labels=tokens).loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_chunked_loss_never_builds_the_full_logits(model_dir: Callable[[str], str]) -> None:
    """With a vocabulary 8x the hidden size, the default loss's peak holds full fp32 logits; chunks do not."""
    training = TrainingSettings(device="cpu", seq_len=64, micro_batch=8)
    default, _ = fwd_bwd_peaks("demo", training)
    chunked, _ = fwd_bwd_peaks("demo", dataclasses.replace(training, loss_chunks=8))
    assert chunked < default


def test_selective_op_saves_every_second_mm_and_the_attention(model_dir: Callable[[str], str]) -> None:
    """One llama block under the policy: the ops saved in forward are the odd-numbered mms and the attention
    kernel, counted independently by a dispatch mode over the same forward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from optprof.measure.checkpointing import save_ops, selective_op_policy
    from optprof.model.info import transformer_blocks
    from optprof.model.loading import load_model

    module = load_model(model_dir("tiny-llama"), device="cpu").module
    block = transformer_blocks(module)[0]
    hidden = torch.randn(2, 16, 32, requires_grad=True)
    positions = module.model.rotary_emb(hidden, torch.arange(16).unsqueeze(0))

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[object] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    with Count() as counted:
        block(hidden, position_embeddings=positions)
    mms = sum(op is torch.ops.aten.mm.default for op in counted.ops)
    others = sum(op in save_ops() and op is not torch.ops.aten.mm.default for op in counted.ops)
    assert mms == 7 and others >= 1  # q, k, v, o, gate, up, down; the attention kernel

    saved: list[object] = []
    out = checkpoint(block, hidden, position_embeddings=positions, use_reentrant=False,
                     context_fn=lambda: create_selective_checkpoint_contexts(selective_op_policy(set(), saved)))
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()
    assert sum(op is torch.ops.aten.mm.default for op in saved) == (mms + 1) // 2  # the 1st, 3rd, 5th, 7th
    assert len(saved) == (mms + 1) // 2 + others


def test_router_gates_are_recomputed(tmp_path: Path) -> None:
    from optprof.measure.checkpointing import router_gate_shapes
    from optprof.model.info import transformer_blocks
    from optprof.model.loading import load_model

    module = load_model(write_tiny("mixtral", tmp_path), device="cpu").module
    assert router_gate_shapes(transformer_blocks(module)[0]) == {(32, 4)}  # hidden -> 4 experts


def test_the_precision_of_each_part() -> None:
    def text(dtype: Dtype, reduces: bool, **fields: object) -> str:
        return step_precision(dtype, TrainingSettings(**fields), reduces).text()  # type: ignore[arg-type]

    assert text(Dtype.FLOAT32, True, amp=Amp.BF16) == \
        "parameters fp32, gathered fp32, compute bf16, gradients fp32, reduce fp32, state fp32"
    assert text(Dtype.FLOAT32, True, mp_param=Precision.BF16, mp_reduce=Precision.FP32) == \
        "parameters fp32, gathered bf16, compute bf16, gradients fp32, reduce fp32, state fp32"
    assert text(Dtype.FLOAT32, True, mp_param=Precision.BF16) == \
        "parameters fp32, gathered bf16, compute bf16, gradients fp32, reduce bf16, state fp32"
    assert text(Dtype.BFLOAT16, False) == "parameters bf16, gathered bf16, compute bf16, gradients bf16, state bf16"


def choose(recipe: str | None = None, ranks: int = 2, **flags: object) -> object:
    values = {"dtype": None, "strategy": None, "amp": None, "mp_policy": None, "activation_checkpointing": None,
              "gradient_checkpointing": False, "loss": None, **flags}
    return step_choice(recipe, ranks=ranks, model_dtype=lambda: Dtype.FLOAT16, **values)  # type: ignore[arg-type]


def test_recipes_set_their_trainers_step_and_flags_override_them() -> None:
    titan = choose("torchtitan")
    assert titan.fields["mp_param"] == Precision.BF16 and titan.fields["mp_reduce"] == Precision.FP32  # type: ignore[attr-defined]
    assert titan.fields["checkpointing"] == Checkpointing.SELECTIVE_OP  # type: ignore[attr-defined]
    assert titan.fields["fsdp_units"] == FsdpUnits.ENDS_GATHERED and titan.fields["amp"] is None  # type: ignore[attr-defined]
    tune = choose("torchtune", activation_checkpointing="selective-layer:3", loss="default")
    assert tune.dtype == Dtype.BFLOAT16 and tune.fields["loss_chunks"] is None  # type: ignore[attr-defined]
    assert (tune.fields["checkpointing"], tune.fields["checkpoint_every"]) == (Checkpointing.SELECTIVE_LAYER, 3)  # type: ignore[attr-defined]
    hf = choose("hf-trainer")
    assert hf.dtype == Dtype.FLOAT16 and hf.fields["amp"] == Amp.BF16 and hf.replicated  # type: ignore[attr-defined]
    assert choose("hf-trainer", ranks=1).replicated is False  # type: ignore[attr-defined]
    lightning = choose("lightning-bf16-mixed", ranks=1)
    assert lightning.fields["mp_param"] is None and lightning.fields["amp"] == Amp.BF16  # type: ignore[attr-defined]
    assert choose("lightning-bf16-mixed").fields["mp_param"] == Precision.BF16  # type: ignore[attr-defined]
    assert set(RECIPES) == {"torchtitan", "accelerate-fsdp2", "hf-trainer", "lightning-bf16-mixed", "torchtune"}
    assert all(recipe.settings for recipe in RECIPES.values())


@pytest.mark.parametrize(("flags", "message"), [
    ({"mp_policy": "bf16,fp32", "strategy": Strategy.DDP}, "does not run"),
    ({"mp_policy": "bf16,int8"}, "unknown precision"),
    ({"mp_policy": "bf16,fp32,fp16"}, "PARAM[,REDUCE]"),
    ({"activation_checkpointing": "selective-layer:0"}, "at least 1"),
    ({"activation_checkpointing": "sometimes"}, "unknown mode"),
    ({"activation_checkpointing": "full:2"}, "takes no"),
    ({"activation_checkpointing": "selective-op", "gradient_checkpointing": True}, "give one"),
    ({"loss": "chunked:"}, "at least 1"),
    ({"loss": "focal"}, "default or chunked"),
])
def test_bad_step_flags_are_one_line_errors(flags: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        choose(**flags)


def test_parsers() -> None:
    assert parse_mp_policy("bf16") == (Precision.BF16, None)
    assert parse_checkpointing("selective-layer:4") == (Checkpointing.SELECTIVE_LAYER, 4)
    assert parse_loss("chunked:8") == 8 and parse_loss("default") is None


@pytest.mark.parametrize("args", [
    ["predict", "demo", "--recipe", "megatron"],
    ["predict", "demo", "--mp-policy", "bf16,fp8"],
    ["predict", "demo", "--activation-checkpointing", "selective-layer:x"],
    ["predict", "demo", "--loss", "chunked:0"],
    ["predict", "demo", "--gradient-checkpointing", "--activation-checkpointing", "selective-op"],
    ["compare", "demo", "--device", "cpu", "--gpus", "2", "--strategy", "ddp", "--mp-policy", "bf16,fp32"],
    ["compare", "demo", "--device", "cpu", "--amp", "fp16", "--dtype", "bfloat16"],
])
def test_bad_combinations_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(args, capsys)
    assert code == 2, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_recipes_command_lists_each_setting_with_its_source(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["recipes", "-f", "json"], capsys)
    assert code == 0
    recipes = {recipe["name"]: recipe for recipe in json.loads(out)}
    assert set(recipes) == set(RECIPES)
    assert any("torchtitan/distributed/fsdp.py: apply_fsdp_to_decoder" in setting["where"]
               for setting in recipes["torchtitan"]["settings"])
    assert "LinearCrossEntropyLoss" in out


def test_a_profile_saved_under_a_recipe_rechecks_under_it(tmp_path: Path, model_dir: Callable[[str], str],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "tune.toml"
    code, _, err = run(["predict", model_dir("tiny-llama"), "-o", "adamw", "--device", "cpu", "--seq-len", "32",
                        "--recipe", "torchtune", "--activation-checkpointing", "selective-op",
                        "--save-profile", str(profile)], capsys)
    assert code == 0, err
    text = profile.read_text()
    assert 'recipe = "torchtune"' in text and 'activation_checkpointing = "selective-op"' in text
    assert 'dtype = "bfloat16"' in text and 'loss = "chunked:8"' in text
    # the recipe supplies what the profile leaves out: without its dtype and loss lines it checks the same
    profile.write_text(text.replace('dtype = "bfloat16"\n', "").replace('loss = "chunked:8"\n', ""))
    code, out, err = run(["check", str(profile), "-f", "json"], capsys)
    assert code == 0, (out, err)
    verdicts = [v["verdict"] for v in json.loads(out)["verdicts"]]
    assert verdicts and set(verdicts) == {"ok"}
    # without the recipe too, it is another step (float32, the default loss): the footprint is judged regressed
    profile.write_text(profile.read_text().replace('recipe = "torchtune"\n', ""))
    code, out, _ = run(["check", str(profile), "-f", "json"], capsys)
    assert code == 1 and "regression" in {v["verdict"] for v in json.loads(out)["verdicts"]}


def test_state_size_follows_the_recipes_parameter_dtype(capsys: pytest.CaptureFixture[str]) -> None:
    def state(*flags: str) -> int:
        code, out, err = run(["state-size", "demo", "-o", "adamw", "-f", "json", *flags], capsys)
        assert code == 0, err
        return int(json.loads(out)["results"][0]["state_bytes"])

    full, tune = state(), state("--recipe", "torchtune")
    assert state("--recipe", "torchtune", "--dtype", "float32") == full  # an explicit flag wins
    assert tune < full and state("--dtype", "bfloat16") == tune  # torchtune's parameters are bfloat16


def test_a_block_class_named_inside_another_block_is_part_of_it(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """mamba's `_no_split_modules` names MambaMixer beside MambaBlock, which holds it: the units FSDP2 shards
    and checkpointing wraps are the blocks alone (sharding the mixer again failed predict from 4 layers on:
    "Cannot concatenate overlapping meshes"; checkpointing both recomputed each mixer twice)."""
    from optprof.model.info import transformer_blocks
    from optprof.model.loading import load_model

    folder = Path(write_tiny("mamba", tmp_path))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    blocks = transformer_blocks(load_model(str(folder)).module)
    assert [type(block).__name__ for block in blocks] == ["MambaBlock"] * 4
    code, out, err = run(["predict", str(folder), "--gpus", "2", "--device", "cuda", "--seq-len", "16", "-o", "adamw",
                          "--activation-checkpointing", "selective-layer:2", "-f", "json"], capsys)
    assert code == 0, err
    assert json.loads(out)["results"][0]["status"] == "ok"
