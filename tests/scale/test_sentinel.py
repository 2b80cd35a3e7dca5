"""Redis Sentinel as the broker and the cache: a real master, a replica and a
`redis-server --sentinel`; the service is given only the sentinel:// URL.

A bridge and a worker answer the game through the master the sentinel names; the sentinel
is then told to fail over (SENTINEL FAILOVER: the replica becomes the master, the old
master its replica), and the same processes, untouched, answer again through the new
master. Every request gets exactly one answer throughout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from mltasks import keys
from mltasks.config import Config, RedisConfig
from mltasks.errors import ConfigError
from tests.conftest import wait_for
from tests.faults.support import (
    GameLoad,
    Service,
    Settings,
    audit,
    report,
    settle,
    summary,
    warm_up,
)
from tests.scale.netns import NOTES
from tests.scale.servers import RedisProc

pytestmark = pytest.mark.scale


def wait_until(predicate: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


MASTER = "mltasks-test"


def test_sentinel_urls_are_validated() -> None:
    r = RedisConfig(url="sentinel://:pw@10.0.0.1:26379;sentinel://10.0.0.2/3")
    assert r.db_url(1) == "sentinel://:pw@10.0.0.1:26379/1;sentinel://10.0.0.2/1"
    with pytest.raises(ConfigError, match=r"redis\.url"):
        RedisConfig(url="sentinel://")
    with pytest.raises(ConfigError, match="sentinel_master"):
        RedisConfig(url="sentinel://h:26379", sentinel_master="")


class Trio:
    def __init__(self, root: Path) -> None:
        self.master = RedisProc(root / "master")
        self.master.start()
        self.replica = RedisProc(root / "replica", replica_of=("127.0.0.1", self.master.port))
        self.replica.start()
        self.sentinel = RedisProc(
            root / "sentinel", sentinel_of=(MASTER, "127.0.0.1", self.master.port)
        )
        self.sentinel.start()

    def master_port(self) -> int:
        addr = self.sentinel.client().sentinel_get_master_addr_by_name(MASTER)
        assert isinstance(addr, tuple), addr
        return int(addr[1])

    def replica_known(self) -> bool:
        try:
            return bool(self.sentinel.client().sentinel_slaves(MASTER))
        except redis.RedisError:
            return False

    @staticmethod
    def role(server: RedisProc) -> str:
        try:
            return str(server.client().info("replication")["role"])
        except redis.RedisError:
            return "unknown"

    def stop(self) -> None:
        for s in (self.sentinel, self.replica, self.master):
            s.stop()


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[Trio]:
    t = Trio(tmp_path / "redis")
    try:
        yield t
    finally:
        t.stop()


def test_broker_and_cache_through_sentinel_survive_a_failover(
    config: Config, trio: Trio, models_dir: Path, tmp_path: Path
) -> None:
    url = trio.sentinel.url
    # The cache client of every part, built from the config alone, finds the master.
    cfg = RedisConfig(url=url, sentinel_master=MASTER)
    client = cfg.client(0, socket_timeout=2)
    client.set("mltasks:probe", "1")
    assert trio.master.client().get("mltasks:probe") == b"1"
    client.close()

    s = Settings(heartbeat_ttl_ms=1500)
    svc = Service(
        tmp_path / "svc",
        database_url=config.database.conninfo,
        redis_url=url,
        models_dir=models_dir,
        settings=s,
    )
    svc.cache.close()
    svc.cache = cfg.client(0, socket_timeout=1.0, socket_connect_timeout=0.5)
    (tmp_path / "svc" / "service.yaml").write_text(
        s.yaml().replace("redis:\n", f"redis:\n  sentinel_master: {MASTER}\n", 1)
    )
    try:
        svc.start_worker("cpu-1", "cpu")
        svc.start_bridge()
        svc.wait_worker("cpu-1", "cpu")
        assert trio.master.client(0).exists(keys.heartbeat("cpu"))
        wait_for(trio.replica_known, 20, "the sentinel to know the replica")
        with psycopg.connect(config.database.conninfo, autocommit=True) as pg:
            warm_up(pg)
            patience = int(s.bound_s * 1000) + 2000
            with GameLoad(
                config.database.conninfo, patient=2, patient_timeout_ms=patience, seed=9
            ) as load:
                load.wait_decisions(10)
                old = trio.master_port()
                trio.sentinel.client().sentinel_failover(MASTER)
                failed_over = time.monotonic()
                wait_for(lambda: trio.master_port() != old, 20, "the sentinel's failover")
                assert trio.master_port() == trio.replica.port
                # Sentinel turns the old master into a replica of the new one a few
                # seconds later, and drops its clients: they ask the sentinel again.
                wait_for(lambda: trio.role(trio.master) == "slave", 40, "the old master demoted")
                # The same worker and bridge serve through the new master by themselves.
                beating = wait_until(
                    lambda: trio.replica.client(0).exists(keys.heartbeat("cpu")), 20
                )
                assert beating, f"no heartbeat on the new master\n{svc.tails()}"
                warm_up(pg, timeout=60)
                recovered_s = time.monotonic() - failed_over
                load.wait_decisions(10)
            settle(pg, s.bound_s + 2)
            problems, rows = audit(
                pg, bound_s=None, decisions=load.decisions, inserted=load.inserted
            )
        assert svc.crashed() == {}, svc.tails()
        assert not load.crashes, load.crashes
        assert not problems, report(problems, rows, svc)
        line = f"sentinel failover: model answers again {recovered_s:.2f}s after; {summary(rows)}"
        print(line)
        NOTES.append(line)
    finally:
        svc.close()
