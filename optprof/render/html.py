"""A report as one self-contained HTML file (`-f html`): the tables as the terminal shows them, the figures
inline (PNG as data URIs), the run's configuration and environment. No network and no JavaScript needed, so
it can be attached to a pull request or an issue as it is.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

from optprof.render.text import render
from optprof.results.reports import ModelReport, Report

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; border-bottom: 1px solid #ddd; }
pre.tables { font-family: Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 12px; line-height: 1.35;
             background: #fafafa; border: 1px solid #eee; padding: 1em; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #eee; }
table.kv { border-collapse: collapse; font-size: 13px; }
table.kv td { border-top: 1px solid #eee; padding: 2px 12px 2px 0; vertical-align: top; }
table.kv td:first-child { color: #555; white-space: nowrap; }
footer { margin-top: 3em; color: #777; font-size: 12px; }
"""
TABLE_WIDTH = 140  # terminal columns the tables are laid out for


def html_document(report: Report, units: str | None = None,
                  models: list[tuple[str, ModelReport]] | None = None) -> str:
    """The whole document: heading, tables, figures (state-size, compare, predict and tune), configuration,
    environment."""
    heading = _heading(report)
    sections = [f"<h1>{html.escape(heading)}</h1>", "<h2>Results</h2>", _tables(report, units, models)]
    if isinstance(report, ModelReport):
        figures = _figures(report, units)
        if figures:
            sections += ["<h2>Figures</h2>", figures]
    config = getattr(report, "config", None)
    if config:
        sections += ["<h2>Configuration</h2>", _key_values(config)]
    sections += ["<h2>Environment</h2>", _key_values(report.environment)]
    created = html.escape(str(getattr(report, "created", "")))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(heading)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(sections)
            + f"\n<footer>optprof {html.escape(str(report.environment.get('optprof', '')))}, {created}. "
              "Figures and tables come from the same report.</footer>\n</body>\n</html>\n")


def _heading(report: Report) -> str:
    if isinstance(report, ModelReport):
        from optprof.render.plots import title

        return title(report)
    return f"optprof {type(report).__name__.removesuffix('Report').lower()}"


def _tables(report: Report, units: str | None, models: list[tuple[str, ModelReport]] | None) -> str:
    from rich.console import Console

    console = Console(record=True, width=TABLE_WIDTH, file=io.StringIO(), force_terminal=False,
                      color_system="truecolor")
    console.print(render(report, units, models))
    return console.export_html(inline_styles=True, code_format='<pre class="tables">{code}</pre>')


def _figures(report: ModelReport, units: str | None) -> str:
    from optprof.render.plots import panels_for, plot_png

    if not panels_for(report):
        return ""
    encoded = base64.b64encode(plot_png(report, units)).decode("ascii")
    return f'<img alt="{html.escape(_heading(report))}" src="data:image/png;base64,{encoded}">'


def _key_values(values: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(_text(value))}</td></tr>"
                   for key, value in values.items())
    return f'<table class="kv">{rows}</table>'


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)
