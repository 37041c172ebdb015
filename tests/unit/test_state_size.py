from __future__ import annotations

import pytest
import torch

from optprof.commands.state_size import measure_entry, run_state_size
from optprof.config import ModelSelection, StateSizeConfig
from optprof.errors import UsageError
from optprof.model.loading import load_model
from optprof.optimizers.registry import REGISTRY, availability, resolve_optimizers
from optprof.optimizers.state import account_state, fused_update, needs_gradient_graph
from optprof.results.vocab import LayerExtent, StateMethod, Status


def state_size(model: str, *optimizers: str, **kwargs) -> dict:  # type: ignore[no-untyped-def]
    report = run_state_size(StateSizeConfig(ModelSelection(model), optimizers, kwargs))
    return {"report": report, **{row.optimizer: row for row in report.results}}


def tensor_count(model: str) -> int:
    return sum(1 for _ in load_model(model).module.parameters())


# The Adam-mini paper, Table 1 (float32, decimal GB).
TABLE_1 = {
    "gpt2-xl": {"adamw": 12.48e9, "adam-mini-paper": 6.56e9},
    "tinyllama-1.1b": {"adamw": 8.80e9, "adam-mini-paper": 4.92e9},
    "meta-llama/Llama-2-7b": {"adamw": 53.92e9, "adam-mini-paper": 28.04e9},
}


@pytest.mark.parametrize("model", sorted(TABLE_1))
def test_paper_table_1_within_half_a_percent(model: str) -> None:
    rows = state_size(model, "adamw", "adam-mini-paper")
    for optimizer, expected in TABLE_1[model].items():
        measured = rows[optimizer].state_bytes
        assert abs(measured - expected) / expected < 0.005, (model, optimizer, measured)


def test_llama_2_7b_adamw_is_exactly_two_fp32_copies_plus_step_counters() -> None:
    rows = state_size("meta-llama/Llama-2-7b", "adamw", "adam-mini")
    params = rows["report"].model.params
    # exp_avg + exp_avg_sq (8 bytes a parameter) and torch's 4-byte step tensor per parameter tensor.
    assert rows["adamw"].state_bytes == 8 * params + 4 * tensor_count("llama-2-7b")
    assert round(rows["adamw"].state_bytes / 1e9, 2) == 53.91
    assert rows["adamw"].ratio_vs_adamw == 1.0
    # The official package keeps one v per row of the embedding and output layers: ≈ 26.96 GB.
    assert abs(rows["adam-mini"].state_bytes - 26.96e9) / 26.96e9 < 0.001
    assert rows["adam-mini"].saving_vs_adamw == pytest.approx(0.5, abs=0.001)


def test_paper_adam_mini_keeps_full_v_for_embedding_and_output_only() -> None:
    rows = state_size("meta-llama/Llama-2-7b", "adam-mini-paper")
    report = rows["report"]
    row = rows["adam-mini-paper"]
    blocks = row.second_moment_entries - report.model.embedding_params
    # Per layer: 32 query heads + 32 key heads + v, o, gate, up, down, two norms = 71; plus the final norm.
    assert blocks == 32 * 71 + 1
    assert row.second_moment_removed == pytest.approx(1 - row.second_moment_entries / report.model.params)
    assert row.state_bytes == 4 * (report.model.params + row.second_moment_entries)


def test_reference_is_measured_when_adamw_not_selected() -> None:
    rows = state_size("demo", "sgd", "momentum")
    report = rows["report"]
    assert report.reference_state_bytes == 8 * report.model.params + 4 * tensor_count("demo")
    assert rows["momentum"].ratio_vs_adamw == pytest.approx(0.5, abs=0.001)
    assert rows["sgd"].state_bytes == 0


def test_demo_state_ordering() -> None:
    rows = state_size("demo", "sgd", "momentum", "adam-mini", "adamw", "adafactor")
    bytes_ = {name: rows[name].state_bytes for name in ("sgd", "momentum", "adam-mini", "adamw")}
    assert bytes_["sgd"] < bytes_["momentum"] <= bytes_["adam-mini"] < bytes_["adamw"]
    assert rows["adafactor"].state_bytes < bytes_["momentum"]


def test_tied_weights_have_state_once(model_dir) -> None:  # type: ignore[no-untyped-def]
    folder = model_dir("tiny-gpt2")
    rows = state_size(folder, "adamw", "adam-mini-paper")
    params = rows["report"].model.params
    assert rows["adamw"].state_bytes == 8 * params + 4 * tensor_count(folder)
    # The tied embedding is one embd_block: its full v counted once.
    assert rows["adam-mini-paper"].second_moment_entries >= rows["report"].model.embedding_params


@pytest.mark.parametrize("optimizer", ["adam-mini", "adam-mini-paper", "adamw", "adafactor", "galore"])
def test_gemma_style_head_dim(model_dir, optimizer: str) -> None:  # type: ignore[no-untyped-def]
    row = state_size(model_dir("tiny-gemma"), optimizer)[optimizer]
    assert row.status == Status.OK, row.reason
    assert row.state_bytes > 0


def test_official_adam_mini_per_head_on_gemma_style_model(model_dir) -> None:  # type: ignore[no-untyped-def]
    loaded = load_model(model_dir("tiny-gemma"), device="cpu")
    model, info = loaded.module, loaded.info
    optimizer = REGISTRY["adam-mini"].build(model, info, {})
    model(torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8))).loss.backward()
    optimizer.step()
    attention = model.model.layers[0].self_attn
    assert optimizer.state[attention.q_proj.weight]["vmean"].shape == (info.num_heads, 1)
    assert optimizer.state[attention.k_proj.weight]["vmean"].shape == (info.num_kv_heads, 1)


def test_official_adam_mini_world_size_ignores_visible_gpus(monkeypatch, model_dir) -> None:  # type: ignore[no-untyped-def]
    """The package takes torch.cuda.device_count() as its world size and would all_gather without a group."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    loaded = load_model(model_dir("tiny-llama"), device="cpu")
    optimizer = REGISTRY["adam-mini"].build(loaded.module, loaded.info, {})
    assert optimizer.world_size == 1
    loaded.module(torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8))).loss.backward()
    optimizer.step()  # with world_size 4 this raises: the default process group is not initialised


# torchao's (opt-in) compile their real CPU step, 30 s each: checked by hand (adamw4bit-torchao: equal, 2026-11-23)
# AdaLomo makes its state with .cuda(): without CUDA it is `unsupported` (tests/test_recipes.py)
CPU_CHECKED = [name for name, e in REGISTRY.items() if availability(e) is None and not name.endswith("-torchao")
               and (name != "adalomo" or torch.cuda.is_available())]


@pytest.mark.parametrize("name", CPU_CHECKED)
def test_meta_accounting_equals_a_real_cpu_step(model_dir, name: str) -> None:  # type: ignore[no-untyped-def]
    """The meta method (placeholders included) sees exactly the state a real step on CPU creates."""
    folder = model_dir("tiny-llama")
    meta = load_model(folder)
    meta_account, _ = measure_entry(REGISTRY[name], meta.module, meta.info, {})

    real = load_model(folder, device="cpu")
    model = real.module
    optimizer = REGISTRY[name].build(model, real.info, {})
    if needs_gradient_graph(optimizer):
        model.set_attn_implementation("eager")  # SDPA's fused kernels have no second derivative
    loss = model(torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8))).loss
    fused = fused_update(optimizer)
    if fused is not None:
        fused(loss)  # LOMO: backward and update in one
    else:
        loss.backward(create_graph=needs_gradient_graph(optimizer))  # SophiaH differentiates the gradients
        optimizer.step()
    params = [p for p in model.parameters() if p.requires_grad]
    real_account = account_state(optimizer, params, REGISTRY[name].second_moment_keys)
    assert meta_account.state_bytes == real_account.state_bytes
    assert meta_account.second_moment_entries == real_account.second_moment_entries


def test_placeholders_are_reported() -> None:
    row = state_size("demo", "adafactor")["adafactor"]
    assert row.method == StateMethod.META_PLACEHOLDERS


def test_only_a_value_read_is_retried_under_placeholders() -> None:
    """Another first-step error is the optimizer's own: its row says it, and no retry steers it elsewhere."""
    from support import optimizers as test_optimizers

    test_optimizers.FailsOnceForItsOwnReason.instances = 0
    own = "support.optimizers:FailsOnceForItsOwnReason"
    reads = "support.optimizers:ReadsAValue"
    breaks = "support.optimizers:ReadsAValueThenBreaks"
    rows = state_size("demo", own, reads, breaks)
    assert rows[own].status == Status.FAILED and rows[own].reason == "ValueError: needs a warm-start checkpoint"
    assert rows[reads].status == Status.OK and rows[reads].method == StateMethod.META_PLACEHOLDERS
    assert rows[reads].state_bytes == 4 * rows["report"].model.params
    assert rows[breaks].status == Status.FAILED
    assert rows[breaks].reason.startswith("RuntimeError: KeyError: 'no such group setting' (on a retry with "
                                          "placeholder scalars; the first step had failed reading a value: ")


def test_shared_storage_counted_once_and_helper_objects_walked() -> None:
    rows = state_size("demo", "support.optimizers:TwoBuffers")
    row = rows["support.optimizers:TwoBuffers"]
    assert row.status == Status.OK
    # its state's names are unknown to optprof: no second-moment figure rather than a made-up 0 / "100% removed"
    assert row.second_moment_entries is None and row.second_moment_removed is None
    assert row.state_bytes == 3 * 4 * rows["report"].model.params  # a, b, helper.buffer; a_again is a


def test_failing_optimizer_is_a_row_and_others_are_kept() -> None:
    rows = state_size("demo", "adamw", "support.optimizers:BrokenOptimizer", "sgd")
    broken = rows["support.optimizers:BrokenOptimizer"]
    assert broken.status == Status.FAILED
    assert "broken on purpose" in broken.reason
    assert rows["adamw"].status == rows["sgd"].status == Status.OK
    assert rows["report"].failed


def test_opt_args_reach_the_optimizer() -> None:
    low = state_size("demo", "galore", rank=4)["galore"].state_bytes
    high = state_size("demo", "galore", rank=16)["galore"].state_bytes
    assert low < high


def test_unknown_optimizer_suggests() -> None:
    with pytest.raises(UsageError, match="Did you mean: adamw"):
        resolve_optimizers(["adamww"])


def test_selection_all_and_commas() -> None:
    assert [e.name for e in resolve_optimizers(["sgd,adamw", "sgd"])] == ["sgd", "adamw"]
    assert len(resolve_optimizers(["all"])) == len(REGISTRY)


def test_bad_import_path() -> None:
    with pytest.raises(UsageError, match="cannot import"):
        resolve_optimizers(["no_such_module_xyz:Opt"])
    with pytest.raises(UsageError, match=r"not a torch\.optim\.Optimizer"):
        resolve_optimizers(["json:JSONDecoder"])


def test_bfloat16_state_follows_parameters() -> None:
    report = run_state_size(StateSizeConfig(ModelSelection("demo", dtype="bfloat16"), ("adamw",)))
    row = report.results[0]
    assert "bfloat16" in row.state_dtypes
    assert row.state_dtypes["bfloat16"] == 4 * report.model.params  # two bf16 moments


def test_parallel_workers_give_the_same_rows_as_one_process() -> None:
    names = ("adamw", "adam-mini", "support.optimizers:BrokenOptimizer", "sgd", "adafactor")
    serial = run_state_size(StateSizeConfig(ModelSelection("demo"), names, jobs=1))
    parallel = run_state_size(StateSizeConfig(ModelSelection("demo"), names, jobs=2))
    assert [r.optimizer for r in parallel.results] == list(names)  # order kept
    assert serial.results == parallel.results


def test_galore_row_states_its_rank() -> None:
    assert state_size("demo", "galore")["galore"].settings.startswith("rank 128")
    assert state_size("demo", "galore", rank=8)["galore"].settings.startswith("rank 8 ")


def test_tensor_subclass_state_counts_its_inner_tensors() -> None:
    rows = state_size("demo", "support.optimizers:QuantizedMomentum")
    row = rows["support.optimizers:QuantizedMomentum"]
    assert row.status == Status.OK, row.reason
    module = load_model("demo").module
    block = 256
    expected = sum(p.numel() + 4 * -(-p.numel() // block) for p in module.parameters())
    assert row.state_bytes == expected
    assert set(row.state_dtypes) == {"uint8", "float32"}


def test_missing_package_is_an_unavailable_row_not_a_failure() -> None:
    import dataclasses

    from optprof.commands.state_size import _row
    from optprof.results.vocab import Status

    missing = dataclasses.replace(REGISTRY["adamw"], name="ghost", package="ghost-pkg", module="no_such_pkg_xyz")
    loaded = load_model("demo")
    row = _row(missing, loaded.module, loaded.info, {})
    assert row.status == Status.UNAVAILABLE
    assert "ghost-pkg is not installed" in row.reason


# ---------------------------------------------------------------------------------- repeated layers (issue 14)


def test_state_that_is_not_affine_in_layers_is_measured_on_the_whole_model() -> None:
    (row,) = run_state_size(StateSizeConfig(ModelSelection("tinyllama-1.1b"),
                                            ("support.optimizers:SquareBuffer",))).results
    assert row.status == Status.OK and row.layer_extent == LayerExtent.NOT_AFFINE, row.method
    params = 22 * 9 + 3  # 22 layers of 9 tensors, the embedding, the final norm and the head
    assert row.state_bytes == 4 * params**2 + 0  # one float32 buffer of (tensors)^2, nothing else (SGD, no momentum)


def test_a_model_whose_layers_differ_is_stepped_whole() -> None:
    """DeepSeek-V3's first three layers are dense: copies of them do not add up to the model."""
    from optprof.commands.state_size import subject_for
    from optprof.model.loading import load_selection

    loaded = load_selection(ModelSelection("deepseek-v3"))
    subject = subject_for(ModelSelection("deepseek-v3"), loaded.module, loaded.info, full_model=False)
    assert subject.copies is None and "layers differ" in (subject.why or "")
    assert subject_for(ModelSelection("llama-2-7b"), *_whole("llama-2-7b"), full_model=False).copies is not None


def _whole(model: str):  # type: ignore[no-untyped-def]
    from optprof.model.loading import load_selection

    loaded = load_selection(ModelSelection(model))
    return loaded.module, loaded.info


def test_a_worker_that_dies_is_a_failed_row_and_the_run_goes_on() -> None:
    """state-size's forked workers (processes.forked.run_each): a worker killed mid-step loses its row, not the run."""
    names = ("support.optimizers:KilledOnStep", "adamw")
    rows = run_state_size(StateSizeConfig(ModelSelection("demo"), names, jobs=2)).results
    killed, adamw = rows
    assert killed.status == Status.FAILED and "the measuring process died" in (killed.reason or "")
    assert adamw.status == Status.OK or "the measuring process died" in (adamw.reason or "")  # same broken pool


def test_placeholder_bools_read_exact_equalities_as_false() -> None:
    """Values are rarely exactly equal: `x == 0` on a meta tensor reads False and `x != 0` True (Prodigy skips its
    update `if d_de_nom == 0`); other bools stay True (`mask.all()`: no padding)."""
    from optprof.optimizers.state import PlaceholderScalars

    x = torch.zeros(1, device="meta")
    with PlaceholderScalars():
        assert (bool(x == 0), bool(x != 0), bool(x > 0), bool((x < 1).all())) == (False, True, True, True)
