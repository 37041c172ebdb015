"""`optprof check`: profiles, verdicts, exit codes, JUnit, --update and --save-profile."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from support.cli import run

from optprof.commands.check import run_check
from optprof.errors import UsageError
from optprof.model.loading import profiles_dir
from optprof.results.profiles import find_profiles, judge, load_profile

SMALL = ["demo", "--device", "cpu", "-o", "adamw,sgd", "--seq-len", "32"]


@pytest.fixture
def profile(tmp_path: Path, capsys) -> Path:  # type: ignore[no-untyped-def]
    """A fresh profile of the demo model, written by predict --save-profile."""
    path = tmp_path / "demo.toml"
    code, _, err = run(["predict", *SMALL, "--save-profile", str(path)], capsys)
    assert code == 0 and "wrote profile" in err
    return path


def test_a_fresh_profile_passes_with_junit_and_json(profile: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    junit = tmp_path / "check.xml"
    code, out, _ = run(["check", str(profile), "--junit", str(junit)], capsys)
    assert code == 0 and "passed: 4 ok" in out
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "4" and suite.get("failures") == "0"
    code, out, _ = run(["check", str(profile), "-f", "json"], capsys)
    body = json.loads(out)
    assert (body["schema"], body["failed"]) == ("optprof.check", False)
    assert {v["measure"] for v in body["verdicts"]} == {"state_bytes", "predicted_peak_bytes"}


def test_expecting_less_memory_is_a_regression_naming_the_measure(profile: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    text = profile.read_text()
    expected = load_profile(profile).expected["adamw"]["state_bytes"]  # type: ignore[union-attr]
    profile.write_text(text.replace(f"state_bytes = {int(expected)}", f"state_bytes = {int(expected) - 4096}"))
    code, out, _ = run(["check", str(profile)], capsys)
    assert code == 1
    line = next(line for line in out.splitlines() if "regression" in line)
    assert "adamw" in line and "state_bytes" in line and "FAILED" in out


def test_improvement_fails_only_when_strict_and_update_refreshes(profile: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    loaded = load_profile(profile)
    assert loaded is not None
    peak = int(loaded.expected["sgd"]["predicted_peak_bytes"])
    profile.write_text(profile.read_text().replace(f"predicted_peak_bytes = {peak}",
                                                   f"predicted_peak_bytes = {peak * 2}  # too pessimistic"))
    code, out, _ = run(["check", str(profile)], capsys)
    assert code == 0 and "improved" in out
    code, _, _ = run(["check", str(profile), "--strict"], capsys)
    assert code == 1
    code, out, _ = run(["check", str(profile), "--update"], capsys)
    assert "updated" in out and "1 values" in out
    text = profile.read_text()
    assert f"predicted_peak_bytes = {peak}" in text
    assert "# too pessimistic" in text and "# Check it with" in text  # comments kept
    code, _, _ = run(["check", str(profile), "--strict"], capsys)
    assert code == 0


def test_corrupt_profiles_name_the_file_and_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "broken.toml"
    broken.write_text('[profile]\nmodel = "demo"\noptimizers = ["sgd"\n')
    code, _, err = run(["check", str(broken)], capsys)
    assert code == 2 and f"{broken}:" in err and "not valid TOML" in err and "Traceback" not in err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[profile]\nmodel = "demo"\noptimizers = ["sgd"]\n\n[expected.sgd]\nstate_byte = 0\n')
    code, _, err = run(["check", str(unknown)], capsys)
    assert code == 2 and f"{unknown}:6" in err and "unknown measure 'state_byte'" in err
    code, _, err = run(["check", str(tmp_path / "missing.toml")], capsys)
    assert code == 2 and "no such profile" in err


def test_gpu_measures_are_skipped_without_a_gpu(tmp_path: Path) -> None:
    path = tmp_path / "gpu.toml"
    path.write_text('[profile]\nmodel = "demo"\noptimizers = ["sgd"]\nseq_len = 32\n\n'
                    "[expected.sgd]\nstate_bytes = 0\npeak_bytes = 123456789\ntokens_per_s = 1000.0\n")
    result = run_check([path], gpu=False)
    verdicts = {v.measure: v for v in result.verdicts}
    assert verdicts["state_bytes"].verdict == "ok"
    assert verdicts["peak_bytes"].verdict == verdicts["tokens_per_s"].verdict == "skipped"
    assert "no GPU" in (verdicts["peak_bytes"].note or "") and not result.failed


def test_tokens_per_s_is_a_lower_bound() -> None:
    loaded = load_profile(profiles_dir() / "checks" / "demo.toml")
    assert loaded is not None
    assert judge(loaded, "sgd", "tokens_per_s", 1000.0, 950.0).verdict == "ok"  # 10% tolerance
    assert judge(loaded, "sgd", "tokens_per_s", 1000.0, 850.0).verdict == "regression"
    assert judge(loaded, "sgd", "tokens_per_s", 1000.0, 1200.0).verdict == "improved"
    assert judge(loaded, "sgd", "state_bytes", 100.0, 101.0).verdict == "regression"  # exact by default


def test_shipped_profiles_cover_the_models_that_matter() -> None:
    profiles = find_profiles([profiles_dir()])  # index.toml has no [profile]: not a profile
    assert {p.model for p in profiles} == {"demo", "llama-2-7b", "tinyllama-1.1b", "gpt2-xl"}
    for p in profiles:
        assert p.measures() == {"state_bytes", "predicted_peak_bytes"} and set(p.expected) == set(p.optimizers)
    with pytest.raises(UsageError, match="no profiles"):
        find_profiles([profiles_dir() / "models"])


def test_profiles_measured_at_once_give_what_one_after_another_gives(profile: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two profiles in forked workers (one per core) and in this process, one by one: the same values, in the
    order of the files, and each profile announced once."""
    from optprof.commands import check

    other = tmp_path / "other.toml"
    other.write_text(profile.read_text().replace('"demo"', '"demo"\n# another profile of the same model'))
    seen: list[str] = []
    monkeypatch.setattr(check, "default_jobs", lambda: 2)
    at_once = run_check([profile, other], gpu=False, on_profile=lambda p: seen.append(p.path.name))
    monkeypatch.setattr(check, "default_jobs", lambda: 1)
    one_by_one = run_check([profile, other], gpu=False)
    assert sorted(seen) == ["demo.toml", "other.toml"]
    assert [(v.profile, v.optimizer, v.measure, v.actual) for v in at_once.verdicts] == \
        [(v.profile, v.optimizer, v.measure, v.actual) for v in one_by_one.verdicts]
    assert all(v.verdict == "ok" for v in at_once.verdicts) and len(at_once.verdicts) == 8


def test_profiles_of_one_model_and_step_share_one_prediction(tmp_path: Path, capsys,  # type: ignore[no-untyped-def]
                                                             monkeypatch) -> None:
    """Issue 28's fourth lever: profiles of one model whose step is the same run predict once, over the union of
    their optimizers (a row is one optimizer's whichever others run beside it); the values are each profile's
    own run's. A profile with another step runs its own."""
    from optprof.commands import check

    paths = {}
    for name, optimizers, seq_len in (("a", "adamw,sgd", "32"), ("b", "adam-mini,sgd", "32"), ("c", "sgd", "16")):
        paths[name] = tmp_path / f"{name}.toml"
        cli = ["predict", "demo", "--device", "cpu", "-o", optimizers, "--seq-len", seq_len, "--save-profile"]
        assert run([*cli, str(paths[name])], capsys)[0] == 0
    runs: list[tuple[str, ...]] = []
    real = check._rows
    monkeypatch.setattr(check, "_rows", lambda command, profile, jobs: runs.append(profile.optimizers) or
                        real(command, profile, jobs))
    monkeypatch.setattr(check, "default_jobs", lambda: 1)
    together = run_check(list(paths.values()), gpu=False)
    assert sorted(runs) == [("adamw", "sgd", "adam-mini"), ("sgd",)]
    assert all(v.verdict == "ok" for v in together.verdicts) and len(together.verdicts) == 10
