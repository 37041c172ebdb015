"""The layers of DESIGN.md, enforced: every import inside optprof/ (functions and TYPE_CHECKING blocks included)
points down the stack, never sideways or up, and the module graph has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import optprof

PACKAGE = Path(optprof.__file__).parent

# Top to bottom. A module may import only modules of a lower layer. A new module gets a layer here.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__main__",),
    ("cli",),
    ("html",),  # a report as one self-contained HTML file: tables, figures, environment
    ("plots",),  # results -> pictures (matplotlib, imported only when a plot is asked for)
    ("report",),  # results -> text: only the CLI renders
    ("check",),
    ("compare", "state_size", "tune"),
    ("preflight",),  # support and fit, decided on fake tensors before anything is launched
    ("predict",),
    ("dist",),  # N ranks, launched or joined, folded by rule
    ("quality",),  # tune's conclusions: best, noise, inclusion, ranking by budget
    ("measure.trial", "measure.tuning"),
    ("measure.tracker", "measure.stats", "measure.isolate", "measure.snapshot"),
    ("measure.step", "measure.sampler", "measure.flops", "measure.routing"),
    ("measure.device",),
    ("measure.nvml",),
    ("parallel",),  # DDP / FSDP2 wrapping, fake process group, fake tensors
    ("optimizers.registry",),
    ("optimizers.adam_mini_paper", "optimizers.adam_mini_official", "optimizers.state", "optimizers.recipes"),
    ("optimizers.hybrid",),  # one optimizer over parts of the model, and what each part holds
    ("baseline", "corpus"),  # profiles and the Measure registry; tune's text
    ("results",),
    ("models",),
    ("setups",),  # what trains: LoRA adapters, frozen parameters
    ("config", "units", "search", "layers", "forked", "space"),
    ("errors", "quiet", "measure", "optimizers", ""),  # "" is the package itself (__version__)
)
RANK = {name: index for index, layer in enumerate(LAYERS) for name in layer}


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
    problems = [f"{module or 'optprof'} has no layer in LAYERS" for module in graph if module not in RANK]
    for module, imports in sorted(graph.items()):
        for target in sorted(imports):
            if module in RANK and target in RANK and RANK[target] <= RANK[module]:
                way = "sideways" if RANK[target] == RANK[module] else "up"
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
    source = "def f():\n    from optprof.compare import run_compare\n    import optprof.cli\n"
    graph = {"predict": imported_modules(source), "compare": {"predict"}, "cli": {"compare"}}
    assert imported_modules(source) == {"compare", "cli"}
    assert violations(graph) == ["optprof.predict imports optprof.cli (up)",
                                 "optprof.predict imports optprof.compare (up)"]
    assert cycles(graph) == ["predict -> cli -> compare -> predict"]  # depth-first: the first cycle on each path
    assert violations({"state_size": {"compare"}}) == ["optprof.state_size imports optprof.compare (sideways)"]
    assert violations({"plugins": set()}) == ["plugins has no layer in LAYERS"]
