"""Private redis-servers (plain, replica, sentinel) and a PostgreSQL cluster that listen on a
given address, optionally started inside a network namespace (`prefix`: `ip netns exec NS`):
the fault suite's servers (tests/servers.py), bound elsewhere. Every server a helper starts,
it stops."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tests.servers import PostgresServer, RedisServer


class RedisProc(RedisServer):
    """redis-server (or redis-server --sentinel) bound to `host`, no persistence."""

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        prefix: Sequence[str] = (),
        replica_of: tuple[str, int] | None = None,
        sentinel_of: tuple[str, str, int] | None = None,  # (master name, host, port)
    ) -> None:
        super().__init__(workdir, host=host, port=port or 0, prefix=prefix)
        self.replica_of = replica_of
        self.sentinel_of = sentinel_of

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
        cmd = [*super().command(), "--protected-mode", "no"]
        if self.replica_of is not None:
            cmd += ["--replicaof", self.replica_of[0], str(self.replica_of[1])]
        return cmd

    def start(self, timeout_s: float = 15.0, probe: bool = True) -> str:
        return super().start(timeout_s, probe)


class NetnsPostgres(PostgresServer):
    """The fault suite's throwaway cluster, listening on `host` (inside a namespace when
    `prefix` is `ip netns exec NS`), trusting that host's network."""

    def __init__(self, host: str = "127.0.0.1", prefix: Sequence[str] = ()) -> None:
        super().__init__(
            host=host, prefix=prefix, options=" -c max_connections=200", trust_network=True
        )
