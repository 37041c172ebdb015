"""Reports -> text: one entry point that picks each report's table. rich is imported only under render/."""

from __future__ import annotations

from rich.console import Group, RenderableType

from optprof.render.compare import compare_table
from optprof.render.console import model_lines, report_units
from optprof.render.tables import check_table, models_table, optimizers_table, predict_table, state_size_table
from optprof.render.tune import tune_table
from optprof.results.reports import (
    CheckReport,
    CompareReport,
    ModelReport,
    ModelsReport,
    OptimizersReport,
    PlanReport,
    PredictReport,
    Report,
    StateSizeReport,
    TuneReport,
)


def render(report: Report, units: str | None = None, models: list[tuple[str, ModelReport]] | None = None) -> Group:
    """Any report as the command that made it shows it. `models`: (label, report) of each run whose rows
    `report` combines, so that every run's model is described."""
    if isinstance(report, CheckReport):
        return check_table(report)
    if isinstance(report, OptimizersReport):
        return optimizers_table(report)
    if isinstance(report, ModelsReport):
        return Group(models_table(report))
    assert isinstance(report, ModelReport)
    chosen = report_units(report, units)
    if isinstance(report, StateSizeReport):
        body: RenderableType = state_size_table(report, chosen)
    elif isinstance(report, CompareReport):
        body = compare_table(report, chosen)
    elif isinstance(report, TuneReport):
        body = tune_table(report, chosen)
    elif isinstance(report, PlanReport):
        from optprof.render.plan import plan_table

        body = plan_table(report, chosen)
    else:
        assert isinstance(report, PredictReport)
        body = predict_table(report, chosen)
    return Group(*model_lines(report, models), body)
