"""Decisions made before compare launches anything: support under a strategy, and whether a step can fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.cli import run
from support.fake_gpu import FakeCard, FakeNvml

from optprof.commands import preflight
from optprof.commands.compare import TrialRunner, run_compare
from optprof.config import CompareConfig, ModelSelection, TrainingSettings, mesh_shape, resolve_shard_size
from optprof.errors import UsageError
from optprof.measure.nvml import smallest_visible_card
from optprof.model.layer_copies import representative_layers
from optprof.model.loading import first_layers, load_config, load_model
from optprof.optimizers.registry import REGISTRY

TRAINING = TrainingSettings(device="cpu", seq_len=32, steps=1)


# ------------------------------------------------------------------------------------------ shallow copies


@pytest.mark.parametrize(("model", "layers"), [("llama-2-7b", 1), ("deepseek-v3", 4), ("gpt-oss-20b", 2)])
def test_the_shallow_copy_has_every_kind_of_layer(model: str, layers: int) -> None:
    """DeepSeek-V3's first three layers are dense (first_k_dense_replace): its MoE layer is the fourth;
    gpt-oss alternates sliding and full attention (layer_types)."""
    config, _, _ = load_config(model)
    assert representative_layers(config) == layers
    whole = {type(m).__name__ for m in load_model(model).module.modules()}
    shallow = load_model(model, layers=layers)
    assert {type(m).__name__ for m in shallow.module.modules()} == whole
    assert shallow.info.num_layers == layers
    if model == "gpt-oss-20b":
        assert first_layers(config, 2)["layer_types"] == config.layer_types[:2]


# ----------------------------------------------------------------------------------------------- support


@pytest.mark.parametrize(("name", "strategy", "status"), [
    ("adamw", "fsdp", "ok"), ("adam-mini-paper", "fsdp", "ok"), ("adam-mini", "hsdp", "ok"),
    ("adafactor", "fsdp", "unsupported"), ("adafactor", "zero2", "unsupported"), ("adafactor", "zero1", "ok"),
])
def test_support_is_decided_by_a_fake_step(name: str, strategy: str, status: str) -> None:
    verdict, reason = preflight.check_support(ModelSelection("demo"), REGISTRY[name], strategy, 4,  # type: ignore[arg-type]
                                              2 if strategy == "hsdp" else None, {}, 1)
    assert verdict == status, reason
    if status == "unsupported":
        assert f"torch's own code cannot run on FSDP2-sharded (DTensor) parameters over 4 ranks ({strategy})" in reason


def test_the_support_matrix_is_cached_per_installed_versions(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("OPTPROF_CACHE_DIR", str(tmp_path))
    calls: list[str] = []

    def fake_check(selection, entry, *args):  # type: ignore[no-untyped-def]
        calls.append(entry.name)
        return ("unsupported", "no DTensors") if entry.name == "adafactor" else ("ok", None)

    monkeypatch.setattr(preflight, "check_support", fake_check)
    first = preflight.support_matrix("fsdp")
    assert first["adafactor"] == ("unsupported", "no DTensors") and first["adamw"] == ("ok", None)
    decided = len(calls)
    assert decided == sum(1 for e in REGISTRY.values() if first[e.name][0] != "unavailable")
    assert preflight.support_matrix("fsdp") == first and len(calls) == decided  # read back, nothing run
    version = preflight.package_version
    monkeypatch.setattr(preflight, "package_version", lambda name: "9.9" if name == "torch" else version(name))
    preflight.support_matrix("fsdp")
    assert len(calls) == 2 * decided  # another torch: decided again
    assert len(list(tmp_path.glob("support-fsdp-*.json"))) == 2
    monkeypatch.setattr(preflight, "source_digest", lambda: "changed builders")
    preflight.support_matrix("fsdp")
    assert len(calls) == 3 * decided  # optprof's own code changed (same version): decided again


def test_optimizers_with_a_strategy_lists_every_optimizers_support(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(preflight, "check_support", lambda selection, entry, *args: (
        ("unsupported", "torch's own code cannot run") if entry.name == "adafactor" else ("ok", None)))
    code, out, _ = run(["optimizers", "--strategy", "fsdp", "--format", "json"], capsys)
    assert code == 0
    body = json.loads(out)
    rows = {row["name"]: row for row in body["optimizers"]}
    assert set(rows) == set(REGISTRY) and body["strategy"] == "fsdp"
    assert rows["adafactor"]["support"] == "unsupported" and rows["adamw"]["support"] == "ok"
    assert all(row["support"] in ("ok", "unsupported", "failed", "unavailable", "undecided") for row in rows.values())
    code, out, _ = run(["optimizers", "--strategy", "fsdp"], capsys)
    assert code == 0 and "runs under fsdp" in out and "adafactor: torch's own code cannot run" in out


def test_compare_decides_unsupported_before_launching_ranks(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def no_launch(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a trial was launched")

    monkeypatch.setattr(TrialRunner, "run", no_launch)
    config = CompareConfig(ModelSelection("demo"), ("adafactor",), TRAINING, gpus=2, strategy="zero2")
    (row,) = run_compare(config).results
    assert (row.status, row.world_size, row.strategy) == ("unsupported", 2, "zero2"), row.reason
    assert "torch's own code cannot run on FSDP2-sharded" in row.reason
    assert any("decided before launching any rank" in note for note in row.notes)


# ---------------------------------------------------------------------------------------------------- fit


def test_capacity_comes_from_the_limit_the_host_or_the_smallest_visible_card(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert preflight.capacity(TrainingSettings(memory_limit_bytes=10**9), 2) == preflight.Capacity(
        10**9, "--memory-limit")
    host = preflight.capacity(TrainingSettings(device="cpu"), 2)
    assert host is not None and host.bytes > 0 and "shared by 2 ranks" in host.source
    cards = FakeNvml([FakeCard("GPU-aa", "00000000:01:00.0", total=80 * 2**30),
                      FakeCard("GPU-bb", "00000000:02:00.0", total=40 * 2**30)])
    assert smallest_visible_card(cards, None) == 40 * 2**30
    assert smallest_visible_card(cards, "0") == 80 * 2**30
    assert smallest_visible_card(cards, "GPU-bb") == 40 * 2**30
    assert smallest_visible_card(cards, "7") is None  # not a card NVML knows
    monkeypatch.setattr(preflight, "open_backend", lambda: (cards, None))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    card = preflight.capacity(TrainingSettings(device="cuda"), 1)
    assert card is not None and card.bytes == 80 * 2**30 - 2 * 2**30  # less the CUDA reserve


def test_a_7b_model_on_this_host_does_not_fit_and_nothing_is_killed(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(["compare", "llama-2-7b", "--device", "cpu", "-o", "adamw", "--micro-batch", "1",
                        "--format", "json"], capsys)
    assert code == 0
    (row,) = json.loads(out)["results"]
    assert row["status"] == "does not fit" and "host memory available" in row["reason"]
    assert row["predicted_peak_bytes"] > 100e9  # weights, gradients and AdamW's two moments in float32


# ------------------------------------------------------------------------------------------------- hsdp


def test_hsdp_mesh_and_shard_size() -> None:
    assert mesh_shape("hsdp", 8, 4) == (2, 4) and mesh_shape("fsdp", 8, None) == (8,)
    assert resolve_shard_size("hsdp", 8, None, 4) == 4  # torchrun: one node's ranks
    assert resolve_shard_size("hsdp", 2, None, None) == 2
    assert resolve_shard_size("fsdp", 2, None, None) is None
    with pytest.raises(UsageError, match="does not divide"):
        resolve_shard_size("hsdp", 6, 4, None)
    with pytest.raises(UsageError, match="applies to --strategy hsdp"):
        resolve_shard_size("fsdp", 2, 1, None)
