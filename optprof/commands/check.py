"""`optprof check`: recompute what each profile guards and judge it against the expected values.

Which command computes which measure is the `Measure` registry's to say (results.profiles.MEASURES); this module
runs each command a profile needs once and reads the measures from its rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from optprof.commands.compare import run_compare
from optprof.commands.predict import run_predict
from optprof.commands.state_size import run_state_size
from optprof.config import (
    CompareConfig,
    DeviceKind,
    Dtype,
    ModelSelection,
    PredictConfig,
    StateSizeConfig,
    TrainingSettings,
    default_jobs,
    parameter_dtype,
)
from optprof.model.loading import default_loaded_dtype, load_config
from optprof.processes.forked import run_each
from optprof.results.profiles import MEASURES, Command, Measure, Profile, find_profiles, judge, update_profile
from optprof.results.reports import CheckReport
from optprof.results.vocab import Judgement, Status
from optprof.trainers import StepChoice, step_choice

NO_GPU = "no GPU on this machine: measured on GPU runners only"


def _step(profile: Profile) -> StepChoice:
    """The profile's step: its recipe, with its own keys over it (as the flags were when it was saved)."""
    return step_choice(profile.recipe, profile.dtype, None, profile.amp, profile.mp_policy,
                       profile.activation_checkpointing, False, profile.loss, 1,
                       lambda: Dtype(default_loaded_dtype(load_config(profile.model)[0])))


def _training(profile: Profile, device: DeviceKind) -> TrainingSettings:
    return TrainingSettings(device=device, seq_len=profile.seq_len, micro_batch=profile.micro_batch,
                            **_step(profile).fields)


def _rows(command: Command, profile: Profile, jobs: int) -> tuple[Any, ...]:
    """The result rows of one command run as the profile describes."""
    selection = ModelSelection(profile.model, _step(profile).dtype)
    if command == "predict":
        return run_predict(PredictConfig(selection, profile.optimizers, _training(profile, profile.device))).results
    if command == "state-size":  # state follows the parameters: amp keeps float32 master weights
        state_dtype = parameter_dtype(selection, _training(profile, profile.device))
        sized = StateSizeConfig(ModelSelection(profile.model, state_dtype), profile.optimizers, jobs=jobs)
        return run_state_size(sized).results
    return run_compare(CompareConfig(selection, profile.optimizers, _training(profile, DeviceKind.CUDA))).results


def plan_commands(measures: list[Measure]) -> dict[Measure, Command]:
    """Which command computes each measure: one that runs anyway where its rows carry the measure, else the
    measure's own first. (predict's rows carry state_bytes too, so state-size is skipped when predict runs.)"""
    running = {m.commands[0] for m in measures if len(m.commands) == 1}
    plan = {}
    for measure in measures:
        plan[measure] = next((c for c in measure.commands if c in running), measure.commands[0])
        running.add(plan[measure])
    return plan


def measure_profile(profile: Profile, gpu: bool, jobs: int = 1) -> dict[str, dict[str, float | None]]:
    """optimizer -> measure -> actual value (None when that optimizer did not produce it)."""
    wanted = [MEASURES[name] for name in MEASURES if name in profile.measures()]
    plan = plan_commands([m for m in wanted if gpu or not m.needs_gpu])
    actual: dict[str, dict[str, float | None]] = {name: {} for name in profile.optimizers}
    for command in dict.fromkeys(plan.values()):
        for row in _rows(command, profile, jobs):
            for measure in (m for m, c in plan.items() if c == command):
                value = getattr(row, measure.row_field) if row.status == Status.OK else None
                actual[row.optimizer][measure.name] = value
    return actual


def _measure_profiles(profiles: list[Profile], gpu: bool, on_profile: Callable[[Profile], None],
                      ) -> list[dict[str, dict[str, float | None]]]:
    """Each profile's actual values, in order. Profiles are independent: on a CPU they run at once in forked
    workers, one per core, each on one thread. With a GPU they run one after another: trials there want
    the card to themselves, and a fork after CUDA has started is not safe."""
    def measured(index: int, here: bool) -> dict[str, dict[str, float | None]]:
        if here:  # one after another: a profile's own optimizers may fork instead
            return measure_profile(profiles[index], gpu, default_jobs())
        return measure_profile(profiles[index], gpu)

    # Each profile is announced once, as its figures arrive. One whose worker died runs again here, where its
    # error shows.
    return run_each(measured, len(profiles), 1 if gpu else default_jobs(),
                    died=lambda i: _announced(profiles[i], on_profile, gpu, default_jobs()),
                    on_result=lambda i, _: on_profile(profiles[i]))


def _announced(profile: Profile, on_profile: Callable[[Profile], None], gpu: bool,
               jobs: int) -> dict[str, dict[str, float | None]]:
    on_profile(profile)
    return measure_profile(profile, gpu, jobs)


def run_check(paths: list[Path], *, update: bool = False, strict: bool = False, gpu: bool | None = None,
              on_profile: Callable[[Profile], None] | None = None) -> CheckReport:
    import torch

    profiles = find_profiles(paths)  # every profile is read (and any bad one reported) before anything runs
    gpu = torch.cuda.is_available() if gpu is None else gpu
    verdicts = []
    updated: dict[str, int] = {}
    measured = _measure_profiles(profiles, gpu, on_profile or (lambda profile: None))
    for profile, actual in zip(profiles, measured, strict=True):
        for optimizer, expected in profile.expected.items():
            for measure, value in expected.items():
                skipped = NO_GPU if MEASURES[measure].needs_gpu and not gpu else None
                verdicts.append(judge(profile, optimizer, measure, value, actual[optimizer].get(measure), skipped))
        if update:
            fresh = {o: {m: v for m, v in values.items() if v is not None} for o, values in actual.items()}
            updated[str(profile.path)] = update_profile(profile.path, fresh)
    return CheckReport(verdicts=tuple(verdicts), profiles=tuple(str(p.path) for p in profiles), strict=strict,
                       updated=updated)


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
            if report.fails(verdict):
                failures += 1
                ET.SubElement(case, "failure", message=f"{verdict.verdict}: {text}").text = text
            elif verdict.verdict == Judgement.SKIPPED:
                skipped += 1
                ET.SubElement(case, "skipped", message=verdict.note or "skipped")
            else:
                ET.SubElement(case, "system-out").text = f"{verdict.verdict}: {text}"
        suite.set("failures", str(failures))
        suite.set("skipped", str(skipped))
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
