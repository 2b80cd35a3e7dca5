"""Private redis-servers (plain, replica, sentinel) and a PostgreSQL cluster that listen on a
given address, optionally started inside a network namespace (`prefix`: `ip netns exec NS`).
Every server a helper starts, it stops."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import redis

from tests.conftest import wait_for
from tests.faults.support import PostgresServer, free_port, missing


class RedisProc:
    """redis-server (or redis-server --sentinel) bound to `host`, no persistence."""

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        prefix: tuple[str, ...] = (),
        replica_of: tuple[str, int] | None = None,
        sentinel_of: tuple[str, str, int] | None = None,  # (master name, host, port)
    ) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            missing("redis-server is not installed")
        self.exe = exe
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port()
        self.prefix = prefix
        self.replica_of = replica_of
        self.sentinel_of = sentinel_of
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "sentinel" if self.sentinel_of else "redis"
        return f"{scheme}://{self.host}:{self.port}"

    def command(self) -> list[str]:
        if self.sentinel_of is not None:
            name, mhost, mport = self.sentinel_of
            conf = self.dir / "sentinel.conf"  # sentinel rewrites its config: a file of its own
            conf.write_text(
                f"port {self.port}\nbind {self.host}\ndaemonize no\ndir {self.dir}\n"
                "protected-mode no\n"
                f"sentinel monitor {name} {mhost} {mport} 1\n"
                f"sentinel down-after-milliseconds {name} 1000\n"
                f"sentinel failover-timeout {name} 5000\n"
            )
            return [*self.prefix, self.exe, str(conf), "--sentinel"]
        cmd = [*self.prefix, self.exe, "--port", str(self.port), "--bind", self.host,
               "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no",
               "--dir", str(self.dir)]  # fmt: skip
        if self.replica_of is not None:
            cmd += ["--replicaof", self.replica_of[0], str(self.replica_of[1])]
        return cmd

    def start(self, timeout: float = 15.0, probe: bool = True) -> None:
        with (self.dir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        if not probe:
            return
        client = self.client()
        proc = self.proc

        def up() -> bool:
            assert proc.poll() is None, f"redis-server exited:\n{self.log_tail()}"
            try:
                return bool(client.ping())
            except (redis.RedisError, OSError):
                return False

        try:
            wait_for(up, timeout, f"redis-server on {self.host}:{self.port}")
        finally:
            client.close()

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(
            host=self.host, port=self.port, db=db, socket_timeout=2, socket_connect_timeout=1
        )

    def log_tail(self, lines: int = 20) -> str:
        path = self.dir / "redis.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class NetnsPostgres(PostgresServer):
    """The fault suite's throwaway cluster, listening on `host` (inside a namespace when
    `prefix` is `ip netns exec NS`), trusting that host's network."""

    def __init__(self, host: str = "127.0.0.1", prefix: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.host = host
        self.prefix = prefix

    def _run(self, *args: object, timeout: float = 90.0) -> str:
        # `ip netns exec NS` first (it needs root), then the fault suite's runuser postgres
        cmd = [str(a) for a in args]
        if self._su is not None:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        res = subprocess.run(
            [*self.prefix, *cmd], capture_output=True, text=True, timeout=timeout,
            cwd=self.dir, check=False,
        )  # fmt: skip
        if res.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise AssertionError(f"{cmd} failed:\n{res.stdout}{res.stderr}\n{log}")
        return res.stdout

    def init(self) -> None:
        super().init()
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 0.0.0.0/0 trust\n")

    def start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses={self.host}"
            f" -c unix_socket_directories={self.dir}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=200"
        )
        self._run(
            self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "60",
            "start",
        )  # fmt: skip
        self.running = True

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    def close(self) -> None:
        if self.running:
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
