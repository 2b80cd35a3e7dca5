"""The source tree keeps its shape (issue 18): modules small enough to read unless they say
why not, the core free of the processes built on it, and every folder a real package.

Static checks over the files (no imports) fail naming the file; the last two tests check
the entry points that keep the core free of bridge and beat.
"""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("mltasks", "bridge", "beat")
MAX_LINES = 500
EXCUSE = "one module because"


def modules(*roots: str) -> Iterator[Path]:
    for root in roots:
        yield from sorted((REPO / root).rglob("*.py"))


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def long_without_reason(paths: Iterator[Path]) -> list[str]:
    """Modules over MAX_LINES whose docstring does not say why they are one module."""
    found = []
    for path in paths:
        source = path.read_text()
        n = len(source.splitlines())
        if n <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(source)) or ""
        if EXCUSE not in " ".join(doc.split()).lower():
            found.append(f"{rel(path)}: {n} lines")
    return found


def imported_roots(tree: ast.AST) -> set[str]:
    """The top-level package of every import in ``tree``, function-level ones included."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def core_importing(paths: Iterator[Path], forbidden: set[str]) -> list[str]:
    """Files that import one of ``forbidden`` (absolute imports: the project uses no others)."""
    return [
        f"{rel(path)} imports {', '.join(sorted(bad))}"
        for path in paths
        if (bad := imported_roots(ast.parse(path.read_text())) & forbidden)
    ]


def folders_without_init(root: Path) -> list[str]:
    """Folders under ``root`` (bytecode caches aside) with no ``__init__.py``: a namespace
    package imports, but half-works (no docstring, mypy and setuptools may skip it)."""
    return [
        rel(folder)
        for folder in sorted(p for p in root.rglob("*") if p.is_dir())
        if "__pycache__" not in folder.parts and not (folder / "__init__.py").is_file()
    ]


def test_no_module_is_over_500_lines_unless_it_says_why() -> None:
    assert long_without_reason(modules(*ROOTS)) == []


def test_the_core_never_imports_bridge_or_beat() -> None:
    assert core_importing(modules("mltasks"), {"bridge", "beat"}) == []


def test_every_folder_under_mltasks_is_a_regular_package() -> None:
    assert folders_without_init(REPO / "mltasks") == []


# --- the checks fail when the rule is broken --------------------------------------------------


def test_a_long_module_without_a_reason_is_found(tmp_path: Path) -> None:
    body = "x = 1\n" * MAX_LINES
    bare = tmp_path / "bare.py"
    bare.write_text('"""A module."""\n' + body)
    excused = tmp_path / "excused.py"
    excused.write_text('"""A table.\n\nOne module because it is a table.\n"""\n' + body)
    short = tmp_path / "short.py"
    short.write_text(body)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(f"{__name__}.REPO", tmp_path)
        assert long_without_reason(iter([bare, excused, short])) == [
            f"bare.py: {MAX_LINES + 1} lines"
        ]


def test_an_import_of_bridge_or_beat_is_found_anywhere(tmp_path: Path) -> None:
    cases = {
        "top.py": "import bridge.loop\n",
        "from_.py": "from beat import schedule\n",
        "inner.py": "def f() -> None:\n    from bridge.publish import x\n",
        "fine.py": "import bridgehead\nfrom mltasks import beats\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(f"{__name__}.REPO", tmp_path)
        found = core_importing(iter(sorted(tmp_path.glob("*.py"))), {"bridge", "beat"})
    assert found == [
        "from_.py imports beat",
        "inner.py imports bridge",
        "top.py imports bridge",
    ]


def test_a_folder_without_init_is_found(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "loose").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "loose" / "mod.py").write_text("")
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "sub").mkdir()
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(f"{__name__}.REPO", tmp_path)
        assert folders_without_init(tmp_path / "pkg") == ["pkg/loose"]


def test_mltasks_bridge_runs_the_bridge_in_its_own_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reaches the bridge as a process (``python -m bridge``), never by import."""
    from mltasks import cli

    ran: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda path, cmd: ran.append(cmd))
    assert cli.main(["bridge"]) == 0
    assert ran == [[sys.executable, "-m", "bridge"]]


def test_celery_beat_on_the_app_gets_the_beat_packages_schedule(
    celery_app: Any, tmp_path: Path
) -> None:
    """``celery -A mltasks beat`` builds the app's ``beat_scheduler``: beat's schedule is in."""
    from celery.utils.imports import symbol_by_name

    from beat.schedule import SCHEDULE, Scheduler

    cls = symbol_by_name(celery_app.conf.beat_scheduler)
    assert cls is Scheduler
    scheduler = cls(app=celery_app, schedule_filename=str(tmp_path / "schedule"), lazy=False)
    try:
        assert set(SCHEDULE) <= set(scheduler.schedule)
        for name, entry in SCHEDULE.items():
            assert scheduler.schedule[name].task == entry["task"]
    finally:
        scheduler.close()
