"""The service's processes, started one way: a bridge, workers, beat and the experience
recorder, each from its one command line, with a config file and an environment that
point it at its servers, its output in a log file, and a handle that signals, pauses,
kills or stops it.

``mltasks dev``, the benchmarks and the tests all start the service through here, so a
flag, an environment variable or the shape of a child's config changes in one place.
`mltasks.ops.processes` below it spawns, waits for and stops any child.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil
import redis
import yaml

from mltasks import keys
from mltasks.ops.processes import (
    STOP_TIMEOUT_S,
    ProcessError,
    Stopped,
    descendants,
    kill_tree,
    log_tail,
    spawn,
    stop_processes,
    wait_until,
)

# --- command lines ------------------------------------------------------------------------


def bridge_argv() -> list[str]:
    """``python -m bridge`` (what ``mltasks bridge`` execs)."""
    return [sys.executable, "-m", "bridge"]


def worker_argv(queues: str, *options: str, app: str = "mltasks") -> list[str]:
    """``celery -A mltasks worker -Q <queues> <options>`` with this interpreter (kombu is
    imported here, not by every CLI start that merely imports dev)."""
    from mltasks.broker.celery_app import worker_command

    return worker_command(queues, *options, app=app)


def beat_argv(schedule: Path, *options: str) -> list[str]:
    """``celery -A mltasks beat <options>``, its schedule kept in the file ``schedule``."""
    celery = [sys.executable, "-m", "celery", "-A", "mltasks", "beat"]
    return [*celery, *options, "-s", str(schedule)]


def experience_argv() -> list[str]:
    """The experience recorder (``mltasks experience record``)."""
    return [sys.executable, "-m", "mltasks.experience"]


# --- a child's configuration --------------------------------------------------------------


def config_text(doc: Mapping[str, Mapping[str, Any]]) -> str:
    """A child's YAML from sections of config/mltasks.yaml's keys, in the order given.
    ``${VAR:-default}`` values stay as written: the child substitutes them when it reads."""
    return yaml.safe_dump(
        {section: dict(keys_) for section, keys_ in doc.items()},
        sort_keys=False,
        default_flow_style=False,
    )


def write_config(path: Path, doc: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write a child's config file (`config_text`) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_text(doc))
    return path


def service_env(
    base: Mapping[str, str] | None = None,
    *,
    config: Path | None = None,
    database_url: str | None = None,
    redis_url: str | None = None,
    models_dir: Path | None = None,
    drop: Iterable[str] = (),
    **extra: str,
) -> dict[str, str]:
    """``base`` (this process's environment) with the overrides a child reads its config
    and servers from (``MLTASKS_CONFIG``, ``..._DATABASE_URL``, ``..._REDIS_URL``,
    ``..._MODELS_DIR``; None or empty leaves one as it is), then ``extra``, less ``drop``."""
    env = dict(os.environ if base is None else base)
    overrides = {
        "MLTASKS_CONFIG": None if config is None else str(config),
        "MLTASKS_DATABASE_URL": database_url,
        "MLTASKS_REDIS_URL": redis_url,
        "MLTASKS_MODELS_DIR": None if models_dir is None else str(models_dir),
    }
    env.update({k: v for k, v in overrides.items() if v})
    env.update(extra)
    for name in drop:
        env.pop(name, None)
    return env


# --- one child ----------------------------------------------------------------------------


class Child:
    """One process we started: its name, command line and log, and what a caller may do
    to it (a signal, a pause, kill -9 of its tree, a graceful stop)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
        own_session: bool = True,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = None if env is None else dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.own_session = own_session
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        """Spawn it (stdin closed, output appended to its log, or inherited without one)."""
        if self._proc is not None:
            raise ProcessError(f"{self.name} was already started")
        self._proc = spawn(
            self.argv, log_path=self.log_path, env=self.env, cwd=self.cwd,
            own_session=self.own_session,
        )  # fmt: skip
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise ProcessError(f"{self.name} was not started")
        return self._proc

    @property
    def started(self) -> bool:
        return self._proc is not None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        """Its exit code once it has exited, else None."""
        return self.proc.poll()

    def wait(self, timeout_s: float | None = None) -> int:
        return self.proc.wait(timeout_s)

    def send(self, sig: int) -> None:
        """Send ``sig`` to the process itself (nothing if it is gone)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP: it holds whatever it holds, as a hung process does."""
        self.send(signal.SIGSTOP)

    def resume(self) -> None:
        self.send(signal.SIGCONT)

    def children(self) -> list[psutil.Process]:
        """The live processes it started (a Celery worker's pool)."""
        return descendants(self.proc)

    def kill_tree(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """kill -9 it and every process it started at once, as a crashed host would."""
        kill_tree(self.proc, timeout_s)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S, sig: int = signal.SIGTERM) -> Stopped:
        """``sig``, a bounded wait, then SIGKILL (its group and descendants too)."""
        return stop_processes([self.proc], timeout_s, sig)[0]

    def log_tail(self, lines: int = 20, missing: str = "") -> str:
        return missing if self.log_path is None else log_tail(self.log_path, lines, missing)


def stop_children(
    children: Iterable[Child], timeout_s: float = STOP_TIMEOUT_S, sig: int = signal.SIGTERM
) -> list[Stopped]:
    """``sig`` to every started child, one shared deadline, SIGKILL to what is left; how
    each ended, in order (children never started are left out)."""
    started = [c for c in children if c.started]
    return stop_processes([c.proc for c in started], timeout_s, sig)


def exited(children: Mapping[str, Child]) -> dict[str, int]:
    """The children that have exited, with their exit codes."""
    return {n: rc for n, c in children.items() if c.started and (rc := c.poll()) is not None}


def heartbeats(
    client: redis.Redis,
    queues: Iterable[str],
    children: Iterable[Child] = (),
    timeout_s: float = 60.0,
) -> None:
    """Until a worker beats for every queue (the bridge routes on those keys);
    ProcessError, with its log, when one of ``children`` exits first or time runs out."""
    queues, children = list(queues), list(children)

    def beating() -> bool:
        for c in children:
            if c.poll() is not None:
                raise ProcessError(
                    f"{c.name} exited ({c.returncode}) at start:\n{c.log_tail(missing='')}"
                )
        try:
            return all(client.exists(keys.heartbeat(q)) for q in queues)
        except (redis.RedisError, OSError):
            return False

    wait_until(beating, timeout_s, f"heartbeats on {','.join(queues)}", interval_s=0.05)
