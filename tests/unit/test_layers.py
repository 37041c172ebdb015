"""The layers of DESIGN.md, enforced: every import inside optprof/ (functions and TYPE_CHECKING blocks included)
points down the stack, never sideways or up, and the module graph has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import optprof

PACKAGE = Path(optprof.__file__).parent

# Top to bottom, folder by folder. A module may import modules of its own folder (the graph stays acyclic) and
# of any lower layer; never a folder beside it or above it. A new folder or top-level module gets a layer here.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__main__",),
    ("cli",),  # the typer app: one module per command, options declared once; the only layer that prints
    ("commands",),  # state-size, compare, predict, check, preflight: orchestrate, return reports
    ("render",),  # reports -> rich tables, plots, one HTML page
    ("tune",),  # the optimizer study's protocol: space, corpus, trial, conclusions, run
    ("measure",),  # the real training step, its trackers, NVML, trials on one or N ranks
    ("distributed",),  # sharding (DDP, ZeRO-1, FSDP2, HSDP), torchrun's ranks, folding rank rows
    ("device",),  # what a card does with the traced step: memory (allocation trace, caching-allocator model, costs
    # outside it) and time (op costs, the stream timeline, measured local op times)
    ("hardware",),  # the catalog of GPUs and networks, as data with sources
    ("optimizers",),  # registry, state accounting, optprof's own optimizers
    ("results",),  # rows, reports, JSON / CSV, profiles
    ("model",),  # MODEL -> config -> module, setups, layer copies
    ("processes",),  # forked pools, isolated trials
    ("trainers",),  # named trainers' step settings (--recipe), pure data
    ("config", "units", "quiet", "files"),
    ("errors", "interrupts", ""),  # "" is the package itself (__version__)
)
RANK = {name: index for index, layer in enumerate(LAYERS) for name in layer}


def folder(module: str) -> str:
    """A module's layer name: its folder under optprof/, or its own name at the top."""
    return module.split(".")[0]


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def is_module(name: str) -> bool:
    base = PACKAGE.joinpath(*name.split(".")) if name else PACKAGE
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_modules(source: str) -> set[str]:
    """optprof modules that `source` imports anywhere (names relative to the package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "optprof" or name.startswith("optprof."):
                inner = name.removeprefix("optprof").removeprefix(".")
                if is_module(inner):
                    found.add(inner)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path.read_text()) - {module_name(path)}
            for path in sorted(PACKAGE.rglob("*.py"))}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that does not point down, as 'a imports b (up|sideways)', and modules with no layer."""
    problems = [f"{module or 'optprof'} has no layer in LAYERS" for module in graph if folder(module) not in RANK]
    for module, imports in sorted(graph.items()):
        for target in sorted(imports):
            if folder(module) == folder(target) or folder(module) not in RANK or folder(target) not in RANK:
                continue
            if RANK[folder(target)] <= RANK[folder(module)]:
                way = "sideways" if RANK[folder(target)] == RANK[folder(module)] else "up"
                problems.append(f"optprof.{module} imports optprof.{target} ({way})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """One 'a -> b -> a' line per cycle found by depth-first search."""
    found, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                found.append(" -> ".join([*path[path.index(target):], target]))
            elif state.get(target) == 0:
                visit(target, [*path, target])
        state[module] = 2

    for module in graph:
        if state[module] == 0:
            visit(module, [module])
    return found


def test_every_import_points_down_and_there_is_no_cycle() -> None:
    graph = import_graph()
    assert violations(graph) == []
    assert cycles(graph) == []


def test_the_checker_finds_upward_imports_inside_functions_and_cycles() -> None:
    """The guard above can fail: an import hidden in a function body, pointing up, is found and named."""
    source = "def f():\n    from optprof.commands.compare import run_compare\n    import optprof.cli.app\n"
    graph = {"measure.trial": imported_modules(source), "commands.compare": {"measure.trial"},
             "cli.app": {"commands.compare"}}
    assert imported_modules(source) == {"commands.compare", "cli.app"}
    assert violations(graph) == ["optprof.measure.trial imports optprof.cli.app (up)",
                                 "optprof.measure.trial imports optprof.commands.compare (up)"]
    assert cycles(graph) == ["measure.trial -> cli.app -> commands.compare -> measure.trial"]  # the first per path
    assert violations({"units": {"config"}}) == ["optprof.units imports optprof.config (sideways)"]
    assert violations({"commands.predict": {"commands.preflight"}}) == []  # within a folder: only cycles count
    assert violations({"plugins.x": set()}) == ["plugins.x has no layer in LAYERS"]
