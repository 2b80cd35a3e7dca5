"""Imports without side effects, no import cycle (issue 28, step 1), and the benchmark
beside the product, not on its path (step 5).

The import graph is read from the source (every ``import``, those inside functions too;
only the ones under ``if TYPE_CHECKING:`` are left out, since they never run), so a cycle
hidden in a function-level import fails here as one at the top does.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("mltasks", "bridge", "beat")


def module_name(path: Path, repo: Path) -> str:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(repo: Path, roots: Iterable[str] = ROOTS) -> dict[str, set[str]]:
    """{module: the project's modules it imports}; ``from a import b`` is an edge to
    ``a.b`` where that is a module, else to ``a``."""
    files = {module_name(p, repo): p for r in roots for p in sorted((repo / r).rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif node.level or node.module is None:
                continue  # the project uses absolute imports only (ruff's TID252)
            else:
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                    for a in node.names
                ]
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_project_has_no_import_cycle() -> None:
    assert cycles(import_graph(REPO)) == []


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "mltasks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from mltasks.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from mltasks import a\n    return a\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mltasks.a import f\n"
    )
    (pkg / "d.py").write_text("from mltasks.c import TYPE_CHECKING\n")
    assert cycles(import_graph(tmp_path, ["mltasks"])) == [["mltasks.a", "mltasks.b"]]


# The one module outside the benchmark allowed to import it: `mltasks bench`'s parser hook.
BENCH_HOOKS = {"mltasks.cli"}


def bench_importers(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """{module outside mltasks.bench: the benchmark modules it imports}, hooks left out."""

    def in_bench(name: str) -> bool:
        return name == "mltasks.bench" or name.startswith("mltasks.bench.")

    return {
        name: sorted(t for t in targets if in_bench(t))
        for name, targets in sorted(graph.items())
        if not in_bench(name) and name not in BENCH_HOOKS and any(in_bench(t) for t in targets)
    }


def test_nothing_outside_the_benchmark_imports_it() -> None:
    """dev, the bridge, the workers and beat run without mltasks/bench/: the emulated game
    they share with it is mltasks.game."""
    assert bench_importers(import_graph(REPO)) == {}


def test_a_function_level_import_of_the_benchmark_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "mltasks"
    (pkg / "bench").mkdir(parents=True)
    for init in (pkg / "__init__.py", pkg / "bench" / "__init__.py"):
        init.write_text("")
    (pkg / "bench" / "gateway.py").write_text("from mltasks import game\n")
    (pkg / "game.py").write_text("")
    (pkg / "cli.py").write_text("def hook():\n    from mltasks.bench import gateway\n")
    (pkg / "dev.py").write_text("def load():\n    from mltasks.bench.gateway import run\n")
    assert bench_importers(import_graph(tmp_path, ["mltasks"])) == {
        "mltasks.dev": ["mltasks.bench.gateway"]
    }


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_the_config_or_the_state_layouts_makes_no_celery_app() -> None:
    out = run_python(
        """
        import sys
        import mltasks, mltasks.config, mltasks.state, mltasks.contract, mltasks.keys
        print(sorted(m for m in ("celery", "mltasks.celery", "kombu") if m in sys.modules))
        """
    )
    assert out == "[]"


def test_celery_finds_the_one_app_with_its_bootsteps() -> None:
    out = run_python(
        """
        from celery.app.utils import find_app
        import mltasks.celery
        app = find_app("mltasks")
        assert app is mltasks.celery.app
        print(app.main, sorted(s.__name__ for s in app.steps["worker"]),
              sorted(s.__name__ for s in app.steps["consumer"]))
        app.loader.import_default_modules()  # what a worker does: the app's `include`
        print(sorted(t for t in app.tasks if t.startswith("mltasks.")))
        """
    )
    assert out.splitlines() == [
        "mltasks ['ModelsStep', 'MonitorStep'] ['ConsumingStep']",
        "['mltasks.canary', 'mltasks.cleanup', 'mltasks.infer_batch', 'mltasks.recover']",
    ]


def test_the_operators_rollback_loads_neither_numpy_nor_the_worker_app() -> None:
    """``models rollback`` on a busy host waits for every CPU second it imports: it needs
    its parser, the pointers and the control channel, not the worker's app or the other
    commands' modules (psycopg, numpy)."""
    out = run_python(
        """
        import sys
        from mltasks.cli import build_parser
        from mltasks.broker.celery_app import control_app
        from mltasks.models import control, deploy, versions

        build_parser("models").parse_args(["models", "rollback", "tank/combat_dqn"])
        control_app().control
        heavy = ("numpy", "psycopg", "onnxruntime", "mltasks.celery", "mltasks.ops.dev",
                 "mltasks.models.shadow", "mltasks.bench.cli")
        print(sorted(m for m in heavy if m in sys.modules))
        """
    )
    assert out == "[]"


def test_every_command_is_known_to_the_lazy_parser() -> None:
    from mltasks.cli import HEAVY_COMMANDS, KNOWN_COMMANDS, build_parser

    def commands(parser: Any) -> set[str]:
        return set(parser._subparsers._group_actions[0].choices)

    everything = commands(build_parser())
    assert everything == set(KNOWN_COMMANDS)
    for name in KNOWN_COMMANDS:
        expected = everything - set(HEAVY_COMMANDS) | ({name} & set(HEAVY_COMMANDS))
        assert commands(build_parser(name)) == expected, name
    assert commands(build_parser("no-such-command")) == everything
