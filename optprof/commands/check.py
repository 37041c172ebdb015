"""`optprof check`: recompute what each profile guards and judge it against the expected values.

Which command computes which measure is the `Measure` registry's to say (results.profiles.MEASURES); this module
runs each command a profile needs once and reads the measures from its rows.
"""

from __future__ import annotations

import dataclasses
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
from optprof.interrupts import Interrupted, stop_children
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
        return run_predict(PredictConfig(selection, profile.optimizers, _training(profile, profile.device),
                                          jobs=jobs)).results
    if command == "state-size":  # state follows the parameters: amp keeps float32 master weights
        state_dtype = parameter_dtype(selection, _training(profile, profile.device))
        sized = StateSizeConfig(ModelSelection(profile.model, state_dtype), profile.optimizers, jobs=jobs)
        return run_state_size(sized).results
    return run_compare(CompareConfig(selection, profile.optimizers, _training(profile, DeviceKind.CUDA))).results


def _step_key(profile: Profile) -> str:
    """What a command run depends on besides the optimizers: the model and its step, as the profile sets them."""
    return repr(dataclasses.replace(profile, path=Path(), optimizers=(), description=None, tolerance={}, expected={}))


class ModelRuns:
    """The command runs of one model's profiles, each once per step over every optimizer those profiles name: a row
    is one optimizer's, whichever others run beside it (predict's shared step gives each its own figures, to the
    byte), so profiles that differ only in their optimizers share one run."""

    def __init__(self, profiles: list[Profile], jobs: int) -> None:
        self.jobs = jobs
        self._optimizers: dict[str, tuple[str, ...]] = {}
        for profile in profiles:
            key = _step_key(profile)
            self._optimizers[key] = tuple(dict.fromkeys((*self._optimizers.get(key, ()), *profile.optimizers)))
        self._rows: dict[tuple[Command, str], dict[str, Any]] = {}

    def rows(self, command: Command, profile: Profile) -> tuple[Any, ...]:
        """`profile`'s optimizers' rows of `command`, from the one run of its step."""
        key = _step_key(profile)
        if (command, key) not in self._rows:
            every = dataclasses.replace(profile, optimizers=self._optimizers.get(key, profile.optimizers))
            self._rows[(command, key)] = {row.optimizer: row for row in _rows(command, every, self.jobs)}
        found = self._rows[(command, key)]
        return tuple(found[name] for name in profile.optimizers)


def plan_commands(measures: list[Measure]) -> dict[Measure, Command]:
    """Which command computes each measure: one that runs anyway where its rows carry the measure, else the
    measure's own first. (predict's rows carry state_bytes too, so state-size is skipped when predict runs.)"""
    running = {m.commands[0] for m in measures if len(m.commands) == 1}
    plan = {}
    for measure in measures:
        plan[measure] = next((c for c in measure.commands if c in running), measure.commands[0])
        running.add(plan[measure])
    return plan


def measure_profile(profile: Profile, gpu: bool, jobs: int = 1,
                    runs: ModelRuns | None = None) -> dict[str, dict[str, float | None]]:
    """optimizer -> measure -> actual value (None when that optimizer did not produce it). `runs`: the command runs
    this profile's model shares with its other profiles (by default its own)."""
    runs = runs or ModelRuns([profile], jobs)
    wanted = [MEASURES[name] for name in MEASURES if name in profile.measures()]
    plan = plan_commands([m for m in wanted if gpu or not m.needs_gpu])
    actual: dict[str, dict[str, float | None]] = {name: {} for name in profile.optimizers}
    for command in dict.fromkeys(plan.values()):
        for row in runs.rows(command, profile):
            for measure in (m for m, c in plan.items() if c == command):
                value = getattr(row, measure.row_field) if row.status == Status.OK else None
                actual[row.optimizer][measure.name] = value
    return actual


def by_model(profiles: list[Profile]) -> list[list[int]]:
    """The profiles' positions grouped by model, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, profile in enumerate(profiles):
        groups.setdefault(profile.model, []).append(index)
    return list(groups.values())


def _measure_profiles(profiles: list[Profile], gpu: bool, on_profile: Callable[[Profile], None],
                      ) -> tuple[list[dict[str, dict[str, float | None]] | None], str | None]:
    """Each profile's actual values, in order. One process per model (its profiles share their command runs,
    `ModelRuns`); models are independent: on a CPU they run at once in forked workers, one per core. With a GPU
    they run one after another: trials there want the card to themselves, and a fork after CUDA has started is
    not safe."""
    groups = by_model(profiles)
    workers = 1 if gpu else default_jobs()

    def measured(group: int, here: bool) -> list[dict[str, dict[str, float | None]]]:
        jobs = default_jobs() if here else max(1, default_jobs() // min(workers, len(groups)))
        members = [profiles[i] for i in groups[group]]
        runs = ModelRuns(members, jobs)
        return [measure_profile(profile, gpu, jobs, runs) for profile in members]

    arrived: dict[int, dict[str, dict[str, float | None]]] = {}

    def announced(group: int, values: list[dict[str, dict[str, float | None]]]) -> None:
        arrived.update(zip(groups[group], values, strict=True))
        for index in groups[group]:
            on_profile(profiles[index])

    def again_here(group: int) -> list[dict[str, dict[str, float | None]]]:
        values = measured(group, True)  # a model whose worker died runs again here, where its error shows
        announced(group, values)
        return values

    # Each model's profiles are announced as its figures arrive.
    try:
        measured_groups = run_each(measured, len(groups), workers, died=again_here, on_result=announced)
    except Interrupted as stop:  # the profiles measured so far are judged; the others say they were not
        stop_children()
        return [arrived.get(index) for index in range(len(profiles))], str(stop)
    values: dict[int, dict[str, dict[str, float | None]]] = {}
    for group, found in zip(groups, measured_groups, strict=True):
        values.update(zip(group, found, strict=True))
    return [values[index] for index in range(len(profiles))], None


def run_check(paths: list[Path], *, update: bool = False, strict: bool = False, gpu: bool | None = None,
              on_profile: Callable[[Profile], None] | None = None) -> CheckReport:
    import torch

    profiles = find_profiles(paths)  # every profile is read (and any bad one reported) before anything runs
    gpu = torch.cuda.is_available() if gpu is None else gpu
    verdicts = []
    updated: dict[str, int] = {}
    measured, interrupted = _measure_profiles(profiles, gpu, on_profile or (lambda profile: None))
    for profile, actual in zip(profiles, measured, strict=True):
        for optimizer, expected in profile.expected.items():
            for measure, value in expected.items():
                skipped = (f"{interrupted} stopped the run before this profile was measured" if actual is None
                           else NO_GPU if MEASURES[measure].needs_gpu and not gpu else None)
                found = None if actual is None else actual[optimizer].get(measure)
                verdicts.append(judge(profile, optimizer, measure, value, found, skipped))
        if actual is None or interrupted is not None:
            continue  # a baseline is refreshed only by a whole run
        if update:
            fresh = {o: {m: v for m, v in values.items() if v is not None} for o, values in actual.items()}
            updated[str(profile.path)] = update_profile(profile.path, fresh)
    return CheckReport(verdicts=tuple(verdicts), profiles=tuple(str(p.path) for p in profiles), strict=strict,
                       updated=updated, interrupted=interrupted)


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
