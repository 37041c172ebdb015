"""Every command's flags driven with generated values (hypothesis): sizes, lists, key=value pairs, paths, numbers
out of range. Each run ends in exit 0, 1 or 2, with no traceback and no "internal error".

The commands' long work (the fake and real steps) is replaced by an immediate exit: what is fuzzed is every check
between the flags and that work, which is where bad input must become one line."""

from __future__ import annotations

import os
from typing import Any

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.cli import run

from optprof.cli.app import app

# generated command lines per run (about 6 s here); OPTPROF_FUZZ_EXAMPLES=5000 for a longer hunt
EXAMPLES = int(os.environ.get("OPTPROF_FUZZ_EXAMPLES", "250"))
COUNT: dict[str, int] = {"cases": 0, "exit 0": 0, "exit 1": 0, "exit 2": 0}
MODELS = ["demo", "gpt2", "tinyllama-1.1b", "/nonexistent", "", "./no-such-folder", "x.json"]
JUNK = ["", "0", "-1", "1", "3", "1e99", "-0.5", "nan", "inf", "abc", "12GB", "1.5TiB", "-3GiB", "0GB", "80GiB",
        "a=b", "lr=1e-3", "betas=(0.9,0.95)", "x,y", "adamw,sgd", "adamw,,adam-mini", "key=1,2", "[1,2]",
        "bf16,fp32", "selective-layer:0", "chunked:-2", "full", "h100-sxm", "local", "ib-400g", "🙂",
        "/nonexistent/x.json", "/tmp", "99999999999999999999999", "auto", "fsdp", "hsdp", "True"]
LONG_WORK = ["optprof.commands.state_size.run_state_size", "optprof.commands.predict.run_predict",
             "optprof.commands.compare.run_compare", "optprof.tune.run.run_tune", "optprof.commands.check.run_check",
             "optprof.commands.preflight.optimizers_with_support", "optprof.commands.plan.run_plan"]


def _commands() -> dict[str, Any]:
    """The app's commands (typer may vendor its own click: matched by attribute, not class)."""
    return dict(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


COMMANDS = _commands()


def _value(param: Any) -> st.SearchStrategy[str]:
    kind = getattr(param, "type", None)
    if hasattr(kind, "choices"):
        return st.sampled_from([*map(str, kind.choices), "nope"])
    if type(kind).__name__ in ("IntParamType", "FloatParamType", "IntRange", "FloatRange"):
        return st.integers(-(10**13), 10**13).map(str) | st.sampled_from(JUNK)
    return st.sampled_from(JUNK) | st.text(max_size=10)


@st.composite
def command_lines(draw: Any) -> list[str]:
    name = draw(st.sampled_from(sorted(COMMANDS)))
    command = COMMANDS[name]
    argv = [name]
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    options = [p for p in command.params if p.param_type_name == "option" and p.name not in ("help", "debug")]
    for argument in arguments:
        if draw(st.booleans()):
            argv.append(draw(st.sampled_from(MODELS)) if argument.name == "model" else draw(_value(argument)))
    for option in draw(st.lists(st.sampled_from(options), max_size=4, unique_by=lambda o: o.name)) if options else []:
        flag = option.opts[0]
        if option.is_flag:
            argv.append(flag)
        else:
            argv += [flag, draw(_value(option))]
    return argv


@pytest.fixture
def no_long_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def reached(*args: Any, **kwargs: Any) -> None:
        raise typer.Exit(0)  # every check before the work passed

    for target in LONG_WORK:
        monkeypatch.setattr(target, reached)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=command_lines())
def test_generated_flags_end_in_0_1_or_2_with_one_line(argv: list[str], no_long_work: None,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    COUNT["cases"] += 1
    code, out, err = run(argv, capsys)
    COUNT[f"exit {code}"] = COUNT.get(f"exit {code}", 0) + 1
    assert code in (0, 1, 2), (argv, code, err[-2000:])
    assert "Traceback" not in out + err, (argv, err[-3000:])
    assert "internal error" not in err, (argv, err)


def test_the_fuzz_ran_its_cases() -> None:
    """Reported in the run's output (-rA): how many command lines were generated in this process."""
    print(f"fuzzed command lines: {COUNT}")
