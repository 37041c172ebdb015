"""`optprof check`: recompute what each profile guards and judge it against the expected values."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optprof.baseline import (
    MEASURES,
    VERDICT_IMPROVED,
    VERDICT_MISSING,
    VERDICT_REGRESSION,
    Profile,
    Verdict,
    find_profiles,
    judge,
    update_profile,
)
from optprof.config import CompareConfig, ModelSelection, PredictConfig, StateSizeConfig, TrainingSettings
from optprof.results import STATUS_OK, environment, now_iso

CHECK_SCHEMA = "optprof.check"
CHECK_SCHEMA_VERSION = 1
NO_GPU = "no GPU on this machine: measured on GPU runners only"


@dataclass(frozen=True)
class CheckReport:
    verdicts: tuple[Verdict, ...]
    profiles: tuple[str, ...]
    strict: bool
    updated: dict[str, int]  # profile -> values rewritten (--update)
    environment: dict[str, Any]
    created: str
    schema: str = CHECK_SCHEMA
    schema_version: int = CHECK_SCHEMA_VERSION

    @property
    def failed(self) -> bool:
        bad = {VERDICT_REGRESSION, VERDICT_MISSING} | ({VERDICT_IMPROVED} if self.strict else set())
        return any(v.verdict in bad for v in self.verdicts)


def _training(profile: Profile, device: str) -> TrainingSettings:
    return TrainingSettings(device=device, amp=profile.amp, seq_len=profile.seq_len, micro_batch=profile.micro_batch,
                            gradient_checkpointing=profile.gradient_checkpointing)


def measure_profile(profile: Profile, gpu: bool) -> dict[str, dict[str, float | None]]:
    """optimizer -> measure -> actual value (None when that optimizer did not produce it)."""
    from optprof.state_size import default_jobs, run_state_size

    wanted = profile.measures()
    selection = ModelSelection(profile.model, profile.dtype)
    actual: dict[str, dict[str, float | None]] = {name: {} for name in profile.optimizers}
    if "predicted_peak_bytes" in wanted:  # its state bytes are state-size's: the real optimizer, fake tensors
        from optprof.predict import run_predict

        predicted = run_predict(PredictConfig(selection, profile.optimizers, _training(profile, profile.device)))
        for row in predicted.results:
            ok = row.status == STATUS_OK
            actual[row.optimizer]["predicted_peak_bytes"] = row.predicted_peak_bytes if ok else None
            actual[row.optimizer]["state_bytes"] = row.state_bytes if ok else None
    elif "state_bytes" in wanted:
        state_dtype = "float32" if profile.amp else profile.dtype  # amp keeps float32 master weights
        sized = run_state_size(StateSizeConfig(ModelSelection(profile.model, state_dtype), profile.optimizers,
                                               jobs=default_jobs()))
        for row in sized.results:
            actual[row.optimizer]["state_bytes"] = row.state_bytes if row.status == STATUS_OK else None
    if gpu and wanted & {"peak_bytes", "tokens_per_s"}:
        from optprof.compare import run_compare

        measured = run_compare(CompareConfig(selection, profile.optimizers, _training(profile, "cuda")))
        for row in measured.results:
            ok = row.status == STATUS_OK
            actual[row.optimizer]["peak_bytes"] = row.peak_bytes if ok else None
            actual[row.optimizer]["tokens_per_s"] = row.tokens_per_s if ok else None
    return actual


def run_check(paths: list[Path], *, update: bool = False, strict: bool = False, gpu: bool | None = None,
              on_profile: Callable[[Profile], None] | None = None) -> CheckReport:
    import torch

    profiles = find_profiles(paths)  # every profile is read (and any bad one reported) before anything runs
    gpu = torch.cuda.is_available() if gpu is None else gpu
    verdicts: list[Verdict] = []
    updated: dict[str, int] = {}
    for profile in profiles:
        if on_profile is not None:
            on_profile(profile)
        actual = measure_profile(profile, gpu)
        for optimizer, expected in profile.expected.items():
            for measure, value in expected.items():
                skipped = NO_GPU if MEASURES[measure][2] and not gpu else None
                verdicts.append(judge(profile, optimizer, measure, value, actual[optimizer].get(measure), skipped))
        if update:
            fresh = {o: {m: v for m, v in values.items() if v is not None} for o, values in actual.items()}
            updated[str(profile.path)] = update_profile(profile.path, fresh)
    return CheckReport(tuple(verdicts), tuple(str(p.path) for p in profiles), strict, updated, environment(),
                       now_iso())


def to_dict(report: CheckReport) -> dict[str, Any]:
    body = dataclasses.asdict(report)
    body["failed"] = report.failed
    return {"schema": body.pop("schema"), "schema_version": body.pop("schema_version"), **body}


def to_junit(report: CheckReport) -> str:
    """JUnit XML: a test suite per profile, a test case per optimizer and measure."""
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites", name="optprof check")
    for profile in report.profiles:
        cases = [v for v in report.verdicts if v.profile == profile]
        suite = ET.SubElement(root, "testsuite", name=profile, tests=str(len(cases)))
        failures = skipped = 0
        for verdict in cases:
            case = ET.SubElement(suite, "testcase", classname=profile, name=f"{verdict.optimizer} {verdict.measure}")
            text = (f"expected {verdict.expected}, actual {verdict.actual}, change "
                    f"{'-' if verdict.change is None else f'{100 * verdict.change:+.3f}%'}, tolerance "
                    f"{100 * verdict.tolerance:g}%")
            if verdict.verdict in (VERDICT_REGRESSION, VERDICT_MISSING) or (
                    report.strict and verdict.verdict == VERDICT_IMPROVED):
                failures += 1
                ET.SubElement(case, "failure", message=f"{verdict.verdict}: {text}").text = text
            elif verdict.verdict == "skipped":
                skipped += 1
                ET.SubElement(case, "skipped", message=verdict.note or "skipped")
            else:
                ET.SubElement(case, "system-out").text = f"{verdict.verdict}: {text}"
        suite.set("failures", str(failures))
        suite.set("skipped", str(skipped))
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
