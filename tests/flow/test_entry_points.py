"""Every production entry point, run as the operator runs it: an invalid configuration is
one line on stderr naming the file and the key, and a non-zero exit status, never a
traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
CELERY = [PY, "-m", "celery", "-A", "mltasks"]
MLTASKS = [PY, "-m", "mltasks.cli"]

ENTRY_POINTS: dict[str, list[str]] = {
    "python -m bridge": [PY, "-m", "bridge"],
    "celery worker": [*CELERY, "worker", "-Q", "cpu", "--pool", "solo"],
    "celery beat": [*CELERY, "beat"],
    "celery flower": [*CELERY, "flower", f"--conf={REPO / 'mltasks' / 'ops' / 'flowerconfig.py'}"],
    "mltasks bridge": [*MLTASKS, "bridge"],
    "mltasks worker": [*MLTASKS, "worker", "-Q", "cpu"],
    "mltasks beat": [*MLTASKS, "beat"],
    "mltasks flower": [*MLTASKS, "flower"],
    "mltasks status": [*MLTASKS, "status"],
    "mltasks db init": [*MLTASKS, "db", "init"],
    "mltasks dev": [*MLTASKS, "dev", "--no-live"],
    "python -m mltasks.ops.status": [PY, "-m", "mltasks.ops.status"],
    "python -m mltasks.ops.dev": [PY, "-m", "mltasks.ops.dev", "--no-live"],
}

BAD_CONFIGS = {
    "typo": ("inference:\n  batch_sise: 64\n", "inference.batch_sise: unknown key"),
    "yaml": ("inference: [\n", "not valid YAML"),
    # a value out of range
    "range": ("inference:\n  batch_size: 500\n", "inference.batch_size: 500 is outside"),
    # a variable that is not set
    "unset": (
        "redis:\n  url: ${MLTASKS_TEST_UNSET_VARIABLE}\n",
        "redis.url: environment variable MLTASKS_TEST_UNSET_VARIABLE is not set",
    ),
}


def _run_all(
    config_file: Path, tmp_path: Path, names: list[str] | None = None
) -> dict[str, subprocess.CompletedProcess[str]]:
    """The entry points (default: all) at once, as they are independent: name -> its run."""
    env = dict(
        os.environ,
        MLTASKS_CONFIG=str(config_file),
        MLTASKS_FLOWER_PASSWORD="a-long-enough-password",
    )
    env.pop("MLTASKS_TEST_UNSET_VARIABLE", None)
    procs = {
        name: subprocess.Popen(
            cmd,
            env=env,
            cwd=tmp_path,  # where `mltasks dev` would put its data: never in the checkout
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, cmd in ENTRY_POINTS.items()
        if names is None or name in names
    }
    done: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=90)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def _one_line(runs: dict[str, subprocess.CompletedProcess[str]], *expected: str) -> None:
    for name, run in runs.items():
        lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
        assert run.returncode != 0, f"{name} exited 0:\n{run.stdout}{run.stderr}"
        assert len(lines) == 1, f"{name} printed {len(lines)} lines:\n" + "\n".join(lines)
        assert all(e in lines[0] for e in expected), f"{name}: {lines[0]}"


def test_a_typo_key_is_one_line_from_every_entry_point(tmp_path: Path) -> None:
    config_file = tmp_path / "mltasks.yaml"
    config_file.write_text("inference:\n  batch_sise: 64\n")
    runs = _run_all(config_file, tmp_path)
    assert set(runs) == set(ENTRY_POINTS)
    _one_line(runs, f"{config_file}: inference.batch_sise: unknown key")


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_every_kind_of_config_error_is_one_line(case: str, tmp_path: Path) -> None:
    text, expected = BAD_CONFIGS[case]
    config_file = tmp_path / "mltasks.yaml"
    config_file.write_text(text)
    runs = _run_all(config_file, tmp_path, ["python -m bridge", "celery worker"])
    _one_line(runs, f"{config_file}: {expected}")


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    runs = _run_all(missing, tmp_path, ["python -m bridge", "celery beat", "mltasks status"])
    _one_line(runs, f"{missing} does not exist")


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_help_shows_defaults_without_backticks() -> None:
    from mltasks.cli import build_parser

    parsers = list(_parsers(build_parser()))
    assert {"bridge", "worker", "beat", "dev", "status", "bench"} <= {
        p.prog.split()[-1] for p in parsers
    }
    for parser in parsers:
        text = parser.format_help()
        assert "`" not in text, f"{parser.prog}: raw backticks\n{text}"
        formatter = parser._get_formatter()
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default in (None, False, True, argparse.SUPPRESS):
                continue
            shown = formatter._format_action(action)
            assert "default" in shown, f"{parser.prog} {action.option_strings}: {shown}"


def test_bench_says_it_flushes_its_redis_dbs() -> None:
    from mltasks.cli import build_parser

    parser = build_parser()
    text = parser.format_help()
    assert "flush Redis dbs 9 and 10" in " ".join(text.split())
    bulk = next(p for p in _parsers(parser) if p.prog == "mltasks bench bulk")
    assert "flushes (empties) its db 9 (broker) and 10 (cache)" in " ".join(
        bulk.format_help().split()
    )


def test_db_init_on_a_missing_database_suggests_create(tmp_path: Path) -> None:
    from psycopg.conninfo import make_conninfo

    from tests.conftest import ADMIN_URL

    url = make_conninfo(ADMIN_URL, dbname="mltasks_test_missing_database")
    env = dict(os.environ, MLTASKS_DATABASE_URL=url)
    env.pop("MLTASKS_CONFIG", None)
    run = subprocess.run(
        [*MLTASKS, "db", "init"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert "mltasks db init --create" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_worker_beat_and_flower_hand_the_rest_of_the_line_to_celery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mltasks import cli

    ran: list[list[str]] = []
    # The commands exec Celery in their own place: recorded here instead (an exec would
    # replace the test run itself).
    monkeypatch.setattr(os, "execv", lambda path, cmd: ran.append(cmd))  # cli.os is os
    assert cli.main(["worker", "--pool", "solo", "-Q", "gpu", "-n", "a@b"]) == 0
    assert cli.main(["beat", "-s", "/tmp/schedule"]) == 0
    assert cli.main(["flower", "--port=5556"]) == 0
    worker, beat, flower = (cmd[cmd.index("-A") + 2 :] for cmd in ran)
    assert worker == ["worker", "-Q", "gpu", "--loglevel", "INFO", "--pool", "solo", "-n", "a@b"]
    assert beat == ["beat", "--loglevel", "WARNING", "-s", "/tmp/schedule"]
    assert flower[0] == "flower" and flower[-1] == "--port=5556"
    with pytest.raises(SystemExit):
        cli.main(["status", "--no-such-option"])
