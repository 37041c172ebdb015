"""Every file the user names, read from random bytes and random TOML / JSON shapes: a reader returns what it
read or raises UsageError with one line, and the CLI turns that into exit code 2 with one line on stderr.
Never a traceback, never "internal error"."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomlkit
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.cli import run

from optprof.errors import UsageError
from optprof.optimizers.registry import REGISTRY
from optprof.results.io import read_report
from optprof.results.profiles import load_profile
from optprof.tune.corpus import user_documents
from optprof.tune.space import read_space_file

EXAMPLES = 60  # per property: enough to cross every branch of a reader, seconds in all
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# JSON and TOML values, nested a few levels: the shapes a damaged or hand-edited file takes.
scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
toml_scalars = st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=12)
toml_values = st.recursive(toml_scalars, lambda inner: st.lists(toml_scalars, max_size=4)
                           | st.dictionaries(st.text(min_size=1, max_size=10), inner, max_size=4), max_leaves=12)
# Keys the readers look for, so that the shapes reach past the first check.
PROFILE_KEYS = st.sampled_from(["model", "optimizers", "dtype", "amp", "seq_len", "micro_batch", "device",
                                "gradient_checkpointing", "recipe", "mp_policy", "activation_checkpointing",
                                "loss", "description", "x"])
REPORT_SCHEMAS = st.sampled_from(["optprof.state-size", "optprof.compare", "optprof.predict", "optprof.check",
                                  "optprof.tune", "optprof.optimizers", "optprof.models", "other"])


def one_line_or_value(read: Callable[[], Any]) -> None:
    """The reader's contract: a value, or a UsageError whose message is one line."""
    try:
        read()
    except UsageError as exc:
        assert "\n" not in str(exc).strip(), str(exc)


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


@SETTINGS
@given(data=st.binary(max_size=200))
def test_random_bytes_never_break_a_reader(tmp_path: Path, data: bytes) -> None:
    one_line_or_value(lambda: load_profile(write(tmp_path, "p.toml", data)))
    one_line_or_value(lambda: read_report(write(tmp_path, "r.json", data)))
    one_line_or_value(lambda: read_space_file(write(tmp_path, "s.toml", data), set(REGISTRY)))
    one_line_or_value(lambda: user_documents(write(tmp_path, "d.jsonl", data)))


@SETTINGS
@given(head=st.dictionaries(PROFILE_KEYS, toml_values, max_size=6),
       expected=st.dictionaries(st.text(min_size=1, max_size=8), toml_values, max_size=3))
def test_random_profiles_are_read_or_refused_in_one_line(tmp_path: Path, head: dict, expected: dict) -> None:
    text = tomlkit.dumps({"profile": head, "expected": expected})
    one_line_or_value(lambda: load_profile(write(tmp_path, "p.toml", text.encode())))


@SETTINGS
@given(space=st.dictionaries(st.sampled_from(["adam", "sgd", "adamw", "nope"]),
                             st.dictionaries(st.sampled_from(["lr", "beta1", "eps", "momentum", "x"]), toml_values,
                                             max_size=3) | toml_scalars, max_size=3))
def test_random_search_spaces_are_read_or_refused_in_one_line(tmp_path: Path, space: dict) -> None:
    text = tomlkit.dumps(space)
    one_line_or_value(lambda: read_space_file(write(tmp_path, "s.toml", text.encode()), set(REGISTRY)))


@SETTINGS
@given(body=st.dictionaries(st.sampled_from(["schema", "schema_version", "results", "model", "config", "verdicts"]),
                            json_values, max_size=6), schema=REPORT_SCHEMAS, version=st.integers(0, 3))
def test_random_reports_are_read_or_refused_in_one_line(tmp_path: Path, body: dict, schema: str,
                                                        version: int) -> None:
    text = json.dumps({**body, "schema": schema, "schema_version": version})
    one_line_or_value(lambda: read_report(write(tmp_path, "r.json", text.encode())))


# Any code point, lone surrogates included: JSON escapes them (\\ud800) and UTF-8 cannot hold them.
code_points = st.integers(0, 0x10FFFF) | st.integers(0xD800, 0xDFFF)  # surrogates drawn often enough to matter
any_text = st.lists(code_points, max_size=8).map(lambda points: "".join(map(chr, points)))


@SETTINGS
@given(lines=st.lists(json_values | st.fixed_dictionaries({"text": any_text}), max_size=4))
@example(lines=[{"text": "\ud800"}])
def test_random_jsonl_data_is_read_or_refused_in_one_line(tmp_path: Path, lines: list) -> None:
    text = "\n".join(json.dumps(line) for line in lines)
    one_line_or_value(lambda: user_documents(write(tmp_path, "d.jsonl", text.encode())))


@pytest.mark.parametrize(("argv", "name"), [
    (["check"], "p.toml"), (["report"], "r.json"),
])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=100))
def test_the_cli_says_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                          name: str, data: bytes) -> None:
    code, _, err = run([*argv, str(write(tmp_path, name, data))], capsys)
    if code == 0:  # a TOML file without a [profile] table is not a profile: nothing to check
        return
    assert code == 2 and err.count("\n") == 1 and err.startswith("optprof: error: "), err
