"""A worker's monitor beats only while the worker consumes and can answer (issue 11,
item 2; issue 15, items 1-2): real Redis, real PostgreSQL, the monitor driven by hand.

On the `gpu` queue and under a member name of their own: the suite's in-process worker
(same host and pid) consumes `cpu` on the same Redis db and beats all along."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from mltasks import keys
from mltasks.config import Config
from mltasks.fallback.levels import LevelStore
from mltasks.fallback.registry import WorkerRegistry
from mltasks.serving.monitor import DatabaseCheck, Monitor, database_problem
from tests.conftest import use_config


@pytest.fixture
def store(config: Config) -> Iterator[LevelStore]:
    s = LevelStore(config)
    yield s
    s.redis.close()


def own(mon: Monitor) -> Monitor:
    mon.member = "monitor-test:1"
    return mon


def test_no_heartbeat_until_the_worker_consumes(config: Config, store: LevelStore) -> None:
    consuming = False
    mon = own(Monitor(config, ["gpu"], store, connected=lambda: consuming))
    mon.tick()
    assert not store.redis.exists(keys.heartbeat("gpu"))
    consuming = True
    mon.tick()
    assert store.redis.exists(keys.heartbeat("gpu"))


def test_no_heartbeat_while_the_database_cannot_be_written(
    config: Config, store: LevelStore
) -> None:
    bad = dataclasses.replace(
        config,
        database=dataclasses.replace(
            config.database, url=config.database.conninfo.replace("dbname=", "dbname=nope_")
        ),
    )
    current = {"cfg": bad}
    check = DatabaseCheck(lambda: current["cfg"])
    mon = own(Monitor(config, ["gpu"], store, database=check))
    try:
        mon.tick()
        assert not store.redis.exists(keys.heartbeat("gpu"))
        assert WorkerRegistry(store.redis).problems("gpu").get(mon.member) == mon.problem
        assert mon.problem is not None and "does not exist" in mon.problem
        current["cfg"] = config  # the database is back
        mon.tick()
        assert mon.problem is None
        assert store.redis.exists(keys.heartbeat("gpu"))
        assert mon.member not in WorkerRegistry(store.redis).problems("gpu")
    finally:
        check.close()


def test_the_cause_of_a_failed_connection_is_named() -> None:
    assert database_problem(
        Exception('FATAL:  password authentication failed for user "ml_user"')
    ).startswith("authentication failed")
    assert database_problem(Exception("connection refused")) == "connection refused"
    assert database_problem(Exception("x Connection refused y")).startswith("connection refused")
    assert database_problem(Exception("timeout expired")).startswith("host unreachable")


def test_a_missing_models_directory_stops_the_heartbeat_and_moves_the_level_to_5(
    config: Config, store: LevelStore, tmp_path: Path
) -> None:
    from mltasks.fallback.probes import Readings

    missing = tmp_path / "absent"
    use_config(dataclasses.replace(config, models=dataclasses.replace(config.models, dir=missing)))
    mon = own(Monitor(config, ["gpu"], store, check_models=True))
    mon.tick()
    assert mon.problem == f"models directory {missing} does not exist"
    assert not store.redis.exists(keys.heartbeat("gpu"))
    healthy = Readings(
        gpu_present=False, vram_used_bytes=None, vram_total_bytes=None, cpu_load_per_core=0.1,
        ram_used_fraction=0.1, queue_lag_s=None, taken_at=0.0, gpu_status="absent",
    )  # fmt: skip
    assert mon.evaluate(healthy) == 5
    state = store.read()
    assert state.level == 5 and str(missing) in state.reason
    # a rules worker has no models to miss
    rules = own(Monitor(config, ["rules"], store, check_models=True))
    rules.tick()
    assert rules.problem is None


def test_own_processes_are_this_process_and_its_children() -> None:
    import os
    import subprocess
    import sys

    from mltasks.serving.monitor import _own_processes

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert _own_processes() >= {os.getpid(), child.pid}
    finally:
        child.kill()
        child.wait()
    assert child.pid not in _own_processes()
