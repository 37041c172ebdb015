"""`optprof recipes`: the named trainers' steps, each setting with the code it follows."""

from __future__ import annotations

import dataclasses
from typing import Any

from rich.markup import escape
from rich.table import Table

from optprof.trainers import RECIPES


def recipe_records() -> list[dict[str, Any]]:
    """Each recipe as plain data (JSON)."""
    return [{**{k: v for k, v in dataclasses.asdict(recipe).items() if k != "settings"},
             "settings": [dataclasses.asdict(s) for s in recipe.settings]} for recipe in RECIPES.values()]


def recipes_table() -> Table:
    table = Table(title="trainer recipes (--recipe NAME; explicit flags override a setting)", show_lines=True)
    table.add_column("recipe", style="bold")
    table.add_column("setting")
    table.add_column("where the trainer's code makes it")
    for recipe in RECIPES.values():
        for index, setting in enumerate(recipe.settings):
            name = f"{recipe.name}\n[dim]{recipe.trainer}\n{recipe.source}[/dim]" if index == 0 else ""
            table.add_row(name, escape(setting.what), escape(setting.where))
        if recipe.note:
            table.add_row("", "[dim]note[/dim]", f"[dim]{escape(recipe.note)}[/dim]")
    return table
