"""The import structure of the package: the doors go one way.

The imports are read from the source (ast), at module level and inside functions
(both run), `importlib.import_module` calls included; imports under
`if TYPE_CHECKING:` never run and are left out."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_names(src: Path) -> dict[str, Path]:
    out = {}
    for path in (src / "maediff").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _run_time_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                todo.extend(child.orelse)
            else:
                todo.append(child)


def imports_of(
    name: str, path: Path, modules: dict[str, Path], type_checking: bool = False
) -> set[str]:
    """The maediff modules that module `name` imports when it runs (with
    `type_checking`, also those under `if TYPE_CHECKING:`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree) if type_checking else _run_time_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            mod = ".".join(base + [node.module or ""]).strip(".") if node.level else node.module
            for a in node.names:  # `from pkg import sub` imports the module pkg.sub
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
        ):
            arg = node.args[0]
            if isinstance(arg, ast.Constant):
                found.add(arg.value)
            elif isinstance(arg, ast.JoinedStr):  # f"{__name__}.{x}": every submodule
                found.update(m for m in modules if m.rpartition(".")[0] == name)
    return {m for m in found if m in modules and m != name}


def import_graph(src: Path = SRC, type_checking: bool = False) -> dict[str, set[str]]:
    modules = module_names(src)
    return {name: imports_of(name, path, modules, type_checking) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_the_reader_sees_the_imports_that_run():
    graph = import_graph()
    assert "maediff.config" in graph["maediff.models.dae"]  # module level
    assert "maediff.models.dae" in graph["maediff.models"]  # importlib over its modules
    assert "maediff.models" in graph["maediff"]  # inside a function
    # only for the type checker: never imported at run time
    assert "maediff.models" not in graph["maediff.pipeline.choose_t"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_through_others():
    assert circles(import_graph()) == []


def test_no_circle_even_through_the_imports_for_the_type_checker():
    """A circle closed only under `if TYPE_CHECKING:` is a type living in the wrong
    module (the benchmark's plan types did, in 0.9.0, and evaluate's EvalPlan for
    choose_t). One is left: the scales' functions take and return config.Config, which
    applies them in get_preset; they belong beside Config, whose module was not
    restructured in this release."""
    assert circles(import_graph(type_checking=True)) == [["maediff.config", "maediff.scales"]]


def test_the_registry_and_the_configuration_name_no_model():
    """The registry is the bottom (no maediff import at all); the configuration reads
    the models from it and imports neither maediff.models nor anything that does."""
    graph = import_graph()
    assert graph["maediff.registry"] == set()
    assert graph["maediff.scales"] == {"maediff.registry"}
    for name in ("maediff.registry", "maediff.scales", "maediff.config"):
        below = reachable(graph, name)
        assert not {m for m in below if m.startswith("maediff.models")}, (name, sorted(below))


def test_the_names_removed_in_0_7_0_are_gone():
    """The 0.4 compatibility names (CHANGELOG 0.7.0): each name has one home."""
    import importlib

    import pytest

    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("maediff.data.raw")
    gone = {
        "maediff.config": ("UNetConfig", "DISPLAY_NAMES", "MODEL_DELTAS", "TABLE1"),
        "maediff.data.preprocess": ("prepare_volume",),
        "maediff.training.trainer": ("prepare_training_data", "LOG_FIELDS"),
        "maediff.pipeline.evaluate": ("load_summary", "table_rows"),
        "maediff.evaluation.aggregate": ("combine_runs",),
        "maediff.reporting.report": ("results_table",),
        "maediff.models.unet": ("count_parameters",),
    }
    for module, names in gone.items():
        m = importlib.import_module(module)
        assert [n for n in names if hasattr(m, n)] == [], module


def test_the_benchmark_is_above_the_pipeline_and_reporting_writes_only():
    """benchmark/ uses pipeline/ and reporting/; neither imports it back (its plan types
    live in benchmark/plan.py, so estimate and status import them at run time)."""
    graph = import_graph()
    for name, deps in graph.items():
        if not name.startswith(("maediff.benchmark", "maediff.cli")):
            assert not {d for d in deps if d.startswith("maediff.benchmark")}, name
    assert "maediff.benchmark.plan" in graph["maediff.benchmark.status"]
    assert "maediff.benchmark.plan" in graph["maediff.benchmark.estimate"]


def test_detection_and_the_evaluation_do_not_import_training():
    """The model file (maediff/weights.py) is below training/: detection, the
    evaluation, its worker processes and the calibration load and save weights without
    the trainer (0.9.0's workers saved weights through training/checkpoint.py)."""
    graph = import_graph()
    for name in (
        "maediff.pipeline.evaluate",
        "maediff.pipeline.detect",
        "maediff.pipeline.workers",
        "maediff.pipeline.calibrate",
        "maediff.evaluation",
        "maediff.weights",
    ):
        below = reachable(graph, name)
        assert not {m for m in below if m.startswith("maediff.training")}, (name, sorted(below))
