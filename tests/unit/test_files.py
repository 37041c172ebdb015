"""Paths checked before any work, files written whole, damaged caches rebuilt, the model's own code at fault in
one line, and an interrupted report's rows and exit code."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
from support.cli import interrupt_second_call, run

from optprof.errors import UsageError
from optprof.files import check_writable, read_cache, write_whole


def test_each_bad_path_is_one_line_before_any_work(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cases = [(["--output", "/nonexistent/x.json"], "the folder /nonexistent does not exist"),
             (["--output", str(tmp_path)], "that is a folder"),
             (["--plot", "/nonexistent/x.png"], "--plot"),
             (["--save-profile", "/nonexistent/p.toml"], "--save-profile")]
    for flags, message in cases:
        start = time.monotonic()
        code, _, err = run(["state-size", "demo", "-o", "adamw", *flags], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (flags, err)
        assert time.monotonic() - start < 1.0, flags  # nothing was loaded first
    code, _, err = run(["predict", "demo", "--memory-snapshot", "/nonexistent/s.html"], capsys)
    assert code == 2 and "--memory-snapshot" in err
    code, _, err = run(["check", "--junit", "/nonexistent/j.xml"], capsys)
    assert code == 2 and "--junit" in err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(UsageError, match="permission denied"):
            check_writable(locked / "x.json", "--output")


def test_a_file_is_replaced_whole_and_keeps_its_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "profile.toml"
    target.write_text("old")
    target.chmod(0o640)
    write_whole(target, b"new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["profile.toml"]  # no temporary left behind


    def killed(source: str, destination: str) -> None:  # the process dies between the write and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_whole(target, b"half")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["profile.toml"]


def test_a_damaged_cache_is_ignored_with_one_warning(tmp_path: Path) -> None:
    cache = tmp_path / "cache.json"
    assert read_cache(cache) == {}  # none yet: silent
    cache.write_text('{"a": 1, "b": ')  # cut mid-write
    with pytest.warns(UserWarning, match="damaged cache file"):
        assert read_cache(cache) == {}
    cache.write_text(json.dumps({"a": 1}))
    assert read_cache(cache) == {"a": 1}


def test_a_truncated_profile_is_reported_as_what_it_is(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    profile = tmp_path / "p.toml"
    code, _, _ = run(["state-size", "demo", "-o", "adamw", "--save-profile", str(profile)], capsys)
    assert code == 0
    text = profile.read_text()
    profile.write_text(text[: len(text) // 2])
    code, _, err = run(["check", str(profile)], capsys)
    assert code == 2 and str(profile) in err and err.count("\n") == 1


def _remote(folder: Path, config: str, modeling: str) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "brokenllm", "architectures": ["BrokenForCausalLM"], "hidden_size": 64, "vocab_size": 128,
        "auto_map": {"AutoConfig": "configuration_broken.BrokenConfig",
                     "AutoModelForCausalLM": "modeling_broken.BrokenForCausalLM"}}))
    (folder / "configuration_broken.py").write_text(
        "from transformers import PretrainedConfig\n\nclass BrokenConfig(PretrainedConfig):\n"
        "    model_type = 'brokenllm'\n" + config)
    (folder / "modeling_broken.py").write_text(
        "from transformers import PreTrainedModel\nfrom .configuration_broken import BrokenConfig\n" + modeling +
        "\nclass BrokenForCausalLM(PreTrainedModel):\n    config_class = BrokenConfig\n"
        "    def __init__(self, config):\n        super().__init__(config)\n        raise ValueError('broken')\n")
    return folder


@pytest.mark.parametrize(("config", "modeling", "message"), [
    ("", "", "failed (modeling_broken.py, line 8, in __init__): ValueError: broken"),
    ("    def __init__(self, **kw):\n        super().__init__(**kw)\n        self.x = 1 / 0\n", "",
     "failed (configuration_broken.py, line 7, in __init__): ZeroDivisionError: division by zero"),
    ("", "import not_a_module_anywhere\n", "cannot be imported: This modeling file requires the following packages"),
])
def test_the_models_own_code_at_fault_is_one_line_naming_it(tmp_path: Path, config: str, modeling: str,
                                                             message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    # transformers imports a folder's code as a module named after the folder: a new name per case
    folder = _remote(tmp_path / f"model_{uuid.uuid4().hex[:8]}", config, modeling)
    code, _, err = run(["state-size", str(folder), "--trust-remote-code", "-o", "adamw"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_an_interrupt_keeps_the_finished_rows_and_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys) -> None:  # type: ignore[no-untyped-def]
    from optprof.commands import state_size

    interrupt_second_call(monkeypatch, state_size, "_row")  # Ctrl-C while the second optimizer is measured
    output = tmp_path / "run.json"
    code, _, err = run(["state-size", "demo", "-o", "sgd,adamw,adam-mini", "--jobs", "1", "--output", str(output)],
                       capsys)
    assert code == 130 and "interrupted by SIGINT" in err
    report = json.loads(output.read_text())
    assert report["interrupted"] == "SIGINT"
    statuses = [row["status"] for row in report["results"]]
    assert sorted(statuses) == ["interrupted", "interrupted", "ok"]  # measured last to first: one finished
