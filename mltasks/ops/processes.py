"""Child processes and private servers: how this repository starts, waits for and stops
any of them (the service's own bridge, workers and beat through `mltasks.ops.launcher`).

``mltasks dev``, the benchmarks and the test suites all start processes they alone own
(a bridge, workers, a ``redis-server``) and must never leave one behind: each is started
with its output in a log file, in a session (process group) of its own unless the caller
wants terminal signals to reach it, waited for on a condition with a deadline, and stopped
with a signal, a bounded wait, then SIGKILL for it, its group and its descendants.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Final, NamedTuple, TypeVar

import psutil
import redis

from mltasks.errors import MLTasksError
from mltasks.redisurl import client_from_url

STOP_TIMEOUT_S: Final = 10.0
T = TypeVar("T")


class ProcessError(MLTasksError):
    """A child process or private server did not start, or a wait ran past its deadline."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the caller retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Something accepts TCP connections at ``host:port``."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def log_tail(path: Path, lines: int = 20, missing: str = "") -> str:
    """The last lines of a log file, for an error message (``missing`` if unreadable)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return missing


def wait_until(
    predicate: Callable[[], T | None],
    timeout_s: float,
    what: str = "condition",
    *,
    interval_s: float = 0.01,
    error: type[Exception] = ProcessError,
) -> T:
    """Poll ``predicate`` until it returns a true value (returned); ``error`` after
    ``timeout_s``. The one polling loop: waits are on conditions, never fixed sleeps."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


# --- child processes ----------------------------------------------------------------------


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    own_session: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdin closed and stdout and stderr appended to ``log_path``
    (inherited when None). ``own_session``: a Ctrl-C at the terminal reaches only us, and
    we stop the child ourselves; False lets terminal signals reach it too."""
    out: IO[bytes] | None = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("ab")
    try:
        return subprocess.Popen(
            list(argv),
            env=None if env is None else dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=None if out is None else subprocess.STDOUT,
            start_new_session=own_session,
        )
    finally:
        if out is not None:
            out.close()  # the child holds its own descriptor


def descendants(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The live processes ``proc`` started (a Celery worker's pool), empty if it is gone."""
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


class Stopped(NamedTuple):
    """How a process ended: its exit code, and whether it had to be killed."""

    code: int
    killed: bool


def stop_processes(
    procs: Iterable[subprocess.Popen[bytes]],
    timeout_s: float = STOP_TIMEOUT_S,
    sig: int = signal.SIGTERM,
) -> list[Stopped]:
    """``sig`` to every live process, one shared deadline, then SIGKILL to what is left (and
    to its process group when it leads one); descendants that outlive their parent are
    killed too: they were ours (psutil checks a pid was not reused before it signals).
    Returns how each ended, in order."""
    procs = list(procs)
    orphans: list[psutil.Process] = []
    for p in procs:
        if p.poll() is None:
            orphans += descendants(p)
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
    deadline = time.monotonic() + timeout_s
    result: list[Stopped] = []
    for p in procs:
        try:
            result.append(Stopped(p.wait(max(0.1, deadline - time.monotonic())), False))
        except subprocess.TimeoutExpired:
            kill_group(p)
            result.append(Stopped(p.wait(timeout_s), True))
    for child in orphans:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(orphans, timeout=timeout_s)
    return result


def stop_process(
    proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S, sig: int = signal.SIGTERM
) -> Stopped:
    """`stop_processes` for one process."""
    return stop_processes([proc], timeout_s, sig)[0]


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process not yet reaped, and its process group when it leads one."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def kill_tree(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """kill -9 the process and every process it started at once, as a crashed host would."""
    victims = [psutil.Process(proc.pid), *descendants(proc)]
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait(timeout_s)
    psutil.wait_procs(victims, timeout=timeout_s)


def _wait_gone(pid: int, timeout_s: float) -> bool:
    """True when process ``pid`` has exited (or is a zombie) within ``timeout_s``."""
    try:
        proc = psutil.Process(pid)
        proc.wait(timeout_s)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return proc.status() == psutil.STATUS_ZOMBIE
    return True


def terminate_pid(pid: int, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """`stop_process` for a process we did not start as a child (no Popen): ``sig``, a
    bounded wait, then SIGKILL."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    if not _wait_gone(pid, timeout_s):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, timeout_s)


# --- a private redis-server ---------------------------------------------------------------


class RedisServer:
    """A ``redis-server`` child bound to ``host`` at a free port, nothing saved to disk, its
    log in ``workdir/redis.log``: a restart comes back empty, as a crashed cache-only Redis
    does. Stop and start again keep the port. ``prefix`` runs it through another command
    (``ip netns exec NS``); ``args`` adds options; ``username``/``password`` are what our
    own clients log in with."""

    def __init__(
        self,
        workdir: Path,
        binary: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        args: Iterable[str] = (),
        prefix: Sequence[str] = (),
        username: str | None = None,
        password: str | None = None,
        own_session: bool = False,
    ) -> None:
        self.workdir = self.dir = workdir
        self.exe = binary
        self.host = host
        self.port = port or free_port()
        self.args = list(args)
        self.prefix = tuple(prefix)
        self.username = username
        self.password = password
        self.own_session = own_session
        self.log_path = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def command(self) -> list[str]:
        """The command line: a plain server; subclasses make replicas or sentinels."""
        return [*self.prefix, self.exe, "--port", str(self.port), "--bind", self.host,
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(self.workdir), *self.args]  # fmt: skip

    def client(self, db: int = 0, socket_timeout: float = 2.0) -> redis.Redis:
        """A client on this server itself (a replica or a sentinel too: not through them)."""
        # host and port, never `url`: a sentinel's URL is sentinel://, which would ask it
        # for its master instead of talking to it
        return client_from_url(
            f"redis://{self.host}:{self.port}/{db}", socket_timeout=socket_timeout,
            socket_connect_timeout=0.5,
            username=self.username, password=self.password,
        )  # fmt: skip

    def answers(self, client: redis.Redis) -> bool:
        """A PING through ``client`` succeeds."""
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def start(self, timeout_s: float = 10.0, probe: bool = True) -> str:
        """Start and (``probe``) wait for a PING; ProcessError, with its log, if it exits or
        does not answer in time. Returns its URL."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        proc = self.proc = spawn(
            self.command(), log_path=self.log_path, own_session=self.own_session
        )
        if not probe:
            return self.url
        client = self.client(socket_timeout=0.5)
        try:

            def up() -> bool:
                if proc.poll() is not None:
                    raise ProcessError(f"redis-server exited:\n{self.log_tail()}")
                return self.answers(client)

            wait_until(up, timeout_s, f"redis-server on {self.host}:{self.port}")
        except ProcessError:
            self.stop()
            raise
        finally:
            client.close()
        return self.url

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """``sig`` (SIGTERM: Redis shuts down cleanly), SIGKILL after ``timeout_s``."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, timeout_s, sig)
