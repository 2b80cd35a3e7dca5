"""What every ``mltasks bench`` command does alike: its report folder and head, the models
it runs (demo models written only where there are none), and its progress lines."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from mltasks.bench import bulkreport
from mltasks.bench.report import machine
from mltasks.state import DEFAULT_LAYOUT


def ensure_models(models_dir: Path, layout: str = DEFAULT_LAYOUT) -> Path:
    """The demo models in ``models_dir``, written only into a folder that holds none (any
    model a discovery finds, in either name, counts: never write over someone's models)."""
    from mltasks.models.discovery import discover

    found, _ = discover(models_dir)
    if found:
        return models_dir
    from mltasks.models.demo import write_demo_models

    t0 = time.perf_counter()
    write_demo_models(models_dir, layout=layout)
    say(f"wrote 54 demo models into {models_dir} in {time.perf_counter() - t0:.1f}s")
    return models_dir


def say(text: str) -> None:
    """A progress line, on stderr (stdout carries the report)."""
    print(text, file=sys.stderr, flush=True)


def command_line() -> str:
    """The command as typed, for the report (when run through the ``mltasks`` script)."""
    if Path(sys.argv[0]).name == "mltasks":
        return shlex.join(["mltasks", *sys.argv[1:]])
    return shlex.join(["python", "-m", "mltasks", *sys.argv[1:]])


def out_dir(args: argparse.Namespace, started: datetime) -> Path:
    """``--out``, or ``bench-results/<time>``; created."""
    out: Path = args.out or Path("bench-results") / started.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextmanager
def workspace(args: argparse.Namespace) -> Iterator[tuple[Path, Path]]:
    """A temporary work directory and the models directory (written there if not given)."""
    with tempfile.TemporaryDirectory(prefix="mltasks-bench-") as tmp:
        work = Path(tmp)
        models = args.models_dir or work / "models"
        yield work, ensure_models(models, getattr(args, "layout", DEFAULT_LAYOUT))


def finish(
    report: dict[str, Any],
    out: Path,
    write: Callable[[dict[str, Any], Path], str] = bulkreport.write,
) -> int:
    """Write report.json and report.md (and plots) with ``write``, print the Markdown."""
    md = write(report, out)
    print(md)
    say(f"report written to {out}/report.md and report.json")
    return 0


def report_head(kind: str, started: datetime, **body: Any) -> dict[str, Any]:
    """A report's common head (what ran, when, where) and its body."""
    return {
        "kind": kind,
        "started_at": started.isoformat(timespec="seconds"),
        "command": command_line(),
        "machine": machine(),
        **body,
    }
