"""Tables that never cut a number: a table wider than the terminal is split into several, each repeating the first
column (the row's name), instead of rich shrinking its columns into "12.…"."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.table import Table

COLUMN_GAP = 3  # between two columns: padding on both sides and the divider (a space in the simple boxes)


def _natural_width(console: Console, column: Any) -> int:
    cells = [column.header, *column._cells]
    return max(console.measure(cell).maximum for cell in cells) + COLUMN_GAP


def _edges(table: Table) -> int:
    """Columns the table takes beyond its cells and gaps: padded outer edges and the box's sides."""
    return (2 if table.pad_edge else 0) + (2 if table.show_edge and table.box is not None else 0) - COLUMN_GAP


def _split(table: Table, console: Console) -> Group | Table:
    columns = list(table.columns)
    widths = [_natural_width(console, column) for column in columns]
    room = console.width - _edges(table)
    if sum(widths) <= room or len(columns) < 3:
        return table
    key, rest = columns[0], columns[1:]
    parts: list[list[Any]] = [[]]
    used = widths[0]
    for column, width in zip(rest, widths[1:], strict=True):
        if parts[-1] and used + width > room:
            parts.append([])
            used = widths[0]
        parts[-1].append(column)
        used += width
    tables = []
    for index, part in enumerate(parts):
        piece = Table(title=table.title if index == 0 else None, title_justify=table.title_justify, box=table.box,
                      pad_edge=table.pad_edge, padding=table.padding, show_header=table.show_header,
                      show_edge=table.show_edge)
        for column in (key, *part):
            piece.add_column(column.header, justify=column.justify, style=column.style, no_wrap=column.no_wrap,
                             header_style=column.header_style)
        for row in range(table.row_count):
            piece.add_row(*(column._cells[row] for column in (key, *part)))
        tables.append(piece)
    return Group(*tables)


def fit_tables(renderable: Any, console: Console) -> Any:
    """The renderable with every table (inside groups too) split to fit `console`'s width."""
    if isinstance(renderable, Group):
        return Group(*(fit_tables(part, console) for part in renderable.renderables))
    if isinstance(renderable, Table):
        return _split(renderable, console)
    return renderable
