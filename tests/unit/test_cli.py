from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from support.cli import run
from typer.testing import CliRunner

from optprof.cli.app import app
from optprof.optimizers.registry import REGISTRY


def test_state_size_json_schema(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(["state-size", "demo", "-o", "adamw,sgd", "--format", "json"], capsys)
    assert code == 0
    body = json.loads(out)
    assert (body["schema"], body["schema_version"]) == ("optprof.state-size", 2)
    model = body["model"]
    assert model["params"] > 0 and 0 < model["embedding_fraction"] < 1
    assert model["embedding_params"] == round(model["embedding_fraction"] * model["params"])
    results = {r["optimizer"]: r for r in body["results"]}
    assert set(results) == {"adamw", "sgd"}
    assert results["sgd"]["state_bytes"] == 0 and results["adamw"]["status"] == "ok"
    assert body["environment"]["packages"]["torch"]
    assert body["config"]["optimizers"] == ["adamw", "sgd"]


def test_state_size_csv_and_output_file(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(["state-size", "demo", "-o", "adamw", "-o", "momentum", "-f", "csv"], capsys)
    assert code == 0
    frame = pd.read_csv(io.StringIO(out))
    assert list(frame["optimizer"]) == ["adamw", "momentum"]
    assert frame.loc[1, "state_bytes"] == pytest.approx(frame.loc[0, "state_bytes"] / 2, rel=0.01)

    target = tmp_path / "result.json"
    code, out, err = run(["state-size", "demo", "-o", "sgd", "--output", str(target)], capsys)
    assert code == 0 and "sgd" in out and "wrote json" in err
    assert json.loads(target.read_text())["results"][0]["optimizer"] == "sgd"


def test_state_size_table_says_its_units(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(["state-size", "demo", "-o", "adamw,adam-mini"], capsys)
    assert code == 0
    assert "MB = 10^6 bytes" in out and "adam-mini" in out  # a small model: MB, not 0.06 GB
    assert "57.17" in out  # demo AdamW: 8 bytes x 7,145,728 parameters + step counters
    code, out, _ = run(["state-size", "demo", "-o", "adamw", "--units", "gib"], capsys)
    assert "GiB = 2^30 bytes" in out
    code, out, _ = run(["state-size", "llama-2-7b", "-o", "sgd"], capsys)
    assert "GB = 10^9 bytes" in out  # AdamW's 53.9 GB decides


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["state-size", "llama-2-7"], "Did you mean: llama-2-7b"),
        (["state-size", "demo", "-o", "adamww"], "unknown optimizer 'adamww'. Did you mean: adamw"),
        (["state-size", "demo", "--dtype", "float64"], "float64"),
        (["state-size", "demo", "--opt-arg", "novalue"], "bad --opt-arg"),
        (["state-size", "demo", "--output", "result.txt"], "cannot tell the format"),
        (["state-size", "demo", "--no-such-flag"], "No such option"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(argv, capsys)
    assert code == 2
    assert message in err
    assert err.startswith("optprof: error:") and err.count("\n") == 1
    assert "Traceback" not in out + err


def test_unreadable_config_is_exit_2(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "config.json").write_text("{ not json")
    code, _, err = run(["state-size", str(tmp_path)], capsys)
    assert code == 2 and "cannot read the config" in err and err.count("\n") == 1


def test_failed_optimizer_row_exit_1(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(["state-size", "demo", "-o", "sgd,support.optimizers:BrokenOptimizer", "-f", "json"],
                       capsys)
    assert code == 1
    statuses = {r["optimizer"]: r["status"] for r in json.loads(out)["results"]}
    assert statuses == {"sgd": "ok", "support.optimizers:BrokenOptimizer": "failed"}


def test_optimizers_lists_registry_and_inclusions(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(["optimizers", "-f", "json"], capsys)
    assert code == 0
    body = json.loads(out)
    assert {o["name"] for o in body["optimizers"]} == set(REGISTRY)
    assert ["sgd", "nesterov", "nadam"] in body["inclusion_chains"]
    adam_mini = next(o for o in body["optimizers"] if o["name"] == "adam-mini")
    assert adam_mini["available"] and adam_mini["version"]


def test_commands_through_clirunner() -> None:
    runner = CliRunner()
    listing = runner.invoke(app, ["optimizers"])
    assert listing.exit_code == 0 and "⊆" in listing.output and "adam-mini-paper" in listing.output
    models = runner.invoke(app, ["models"])
    assert models.exit_code == 0 and "meta-llama/Llama-2-7b" in models.output
    for command in ("state-size", "optimizers", "models"):
        help_ = runner.invoke(app, [command, "--help"])
        assert help_.exit_code == 0 and "Usage" in help_.output


def test_help_does_not_import_torch() -> None:
    code = "import sys; from optprof.cli.app import main\ntry:\n    main(['--help'])\nexcept SystemExit: pass\n" \
           "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_a_config_transformers_cannot_build_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                pad_token_id=500).save_pretrained(tmp_path)  # a padding id outside the vocabulary
    capsys.readouterr()  # what writing the config printed is not optprof's
    code, out, err = run(["state-size", str(tmp_path), "-o", "sgd"], capsys)
    assert code == 2 and out == ""
    assert err == ("optprof: error: cannot build a causal LM from this config: "
                   "Padding_idx must be within num_embeddings\n")


@pytest.mark.parametrize(("argv", "says"), [
    (["state-size", "-o", "adamw,sgd", "--opt-arg", "lrr=0.1"], "--opt-arg lrr: none of the selected optimizers"),
    (["predict", "--strategy", "ddp", "--gpus", "2"], "--strategy ddp: predict shards with FSDP2"),
    (["tune", "--micro-batch", "auto"], "--micro-batch: expected a whole number"),
])
def test_bad_flag_values_are_one_line_and_exit_2(capsys, argv: list[str], says: str) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(argv, capsys)
    assert (code, out) == (2, "") and err.count("\n") == 1 and says in err, err


def test_bad_files_are_one_line_and_exit_2(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The inputs that ended in "internal error" before: a profile that is not UTF-8, and a --space whose range
    is not numbers."""
    profile = tmp_path / "p.toml"
    profile.write_bytes(b'[profile]\nmodel = "demo\xff\xfe"\n')
    space = tmp_path / "s.toml"
    space.write_text('[adam]\nlr = {low = "a", high = 1}\n')
    for argv, says in ((["check", str(profile)], "not UTF-8 text"), (["report", str(profile)], "not UTF-8 text"),
                       (["tune", "-o", "adam", "--space", str(space)], "adam.lr: low and high must be numbers")):
        code, out, err = run(argv, capsys)
        assert (code, out) == (2, "") and err.count("\n") == 1 and says in err, err


@pytest.mark.parametrize(("raised", "code", "message"), [(0, 0, ""), (None, 0, ""), (2, 2, ""),
                                                          ("optprof: done badly", 1, "optprof: done badly")])
def test_the_console_command_exits_with_mains_code_after_its_exit_handlers(
        raised: object, code: int, message: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`console_main` ends the process itself (no interpreter teardown): with main's exit code, after the exit
    handlers (os._exit is caught here)."""
    import atexit
    import os

    from optprof.cli import app as app_module

    ran: list[str] = []

    class Exited(Exception):
        pass

    def exit_now(status: int) -> None:
        ran.append("exit")
        raise Exited(status)

    def main() -> None:
        raise SystemExit(raised)

    monkeypatch.setattr(app_module, "main", main)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: ran.append("handlers"))  # not this pytest's own
    monkeypatch.setattr(os, "_exit", exit_now)
    with pytest.raises(Exited) as exited:
        app_module.console_main()
    assert exited.value.args == (code,) and ran == ["handlers", "exit"]
    assert capsys.readouterr().err.strip() == message


def test_python_dash_m_optprof_exits_with_the_usage_code() -> None:
    done = subprocess.run([sys.executable, "-m", "optprof", "state-size", "no-such-model-anywhere", "--format", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("optprof: error:")
