"""Fixtures on real services: a template database per session, a fresh copy per test,
a real Celery worker, real Redis. Waiting is on conditions, never on fixed sleeps."""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import pytest
from psycopg import sql

if TYPE_CHECKING:
    from celery import Celery

    from tests.servers import TestServices

TESTS = Path(__file__).resolve().parent
os.environ["MLTASKS_CONFIG"] = str(TESTS / "config" / "test.yaml")
os.environ.pop("MLTASKS_DATABASE_URL", None)
os.environ.pop("MLTASKS_REDIS_URL", None)

from mltasks.config import Config, load_config, set_config  # noqa: E402

ADMIN_URL = os.environ.get("MLTASKS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
NO_DATABASE = "mltasks_test_no_database"
# Part of every database name this session creates: never the name of anyone else's.
SESSION = f"{os.getpid()}_{uuid.uuid4().hex[:8]}"
SERVICES: TestServices | None = None  # set by pytest_configure
T = TypeVar("T")

# Probe readings of a healthy host without a GPU: the test host's own load must not move
# the fallback level (the workers read them from the file PROBE_FILE_ENV names).
HEALTHY_HOST: dict[str, Any] = {
    "gpu_present": False,
    "vram_used_bytes": None,
    "vram_total_bytes": None,
    "cpu_load_per_core": 0.5,
    "ram_used_fraction": 0.3,
    "queue_lag_s": None,
    "gpu_status": "absent",
}


def pytest_configure(config: pytest.Config) -> None:
    """The session's own servers, before any fixture or test module reads them.

    A private redis-server unless MLTASKS_TEST_REDIS_URL names one (the tests flush the
    Redis databases they use); PostgreSQL at MLTASKS_TEST_PG (default the local server as
    postgres, or an embedded one when that does not answer), where the tests create their
    own uniquely named databases and drop them. The servers' URLs then also become the
    children's MLTASKS_REDIS_URL / MLTASKS_DATABASE_URL defaults, so a subprocess a test
    forgets to point somewhere still never reaches the configured (live) servers.
    """
    global ADMIN_URL, SERVICES
    from psycopg.conninfo import make_conninfo

    from tests.servers import start_test_services

    data = Path(tempfile.mkdtemp(prefix="mltasks-test-servers-"))
    services = SERVICES = start_test_services(data)
    config.add_cleanup(lambda: shutil.rmtree(data, ignore_errors=True))
    config.add_cleanup(services.stop)
    ADMIN_URL = os.environ["MLTASKS_TEST_PG"]
    os.environ["MLTASKS_REDIS_URL"] = os.environ["MLTASKS_TEST_REDIS_URL"]
    # A database that never exists: a child that was not given one fails, loudly.
    os.environ["MLTASKS_DATABASE_URL"] = make_conninfo(ADMIN_URL, dbname=NO_DATABASE)


def wait_for(
    predicate: Callable[[], T | None], timeout: float = 20.0, what: str = "condition"
) -> T:
    """Poll a condition until it holds; fail with `what` after `timeout` seconds."""
    from mltasks.ops.processes import wait_until

    return wait_until(predicate, timeout, what, error=AssertionError)


def app_with_broker(config: Config, broker_url: str, name: str = "test") -> Celery:
    """A Celery app with the service's settings on another broker (nothing consumes there,
    or nothing answers at all)."""
    from celery import Celery

    from mltasks.broker.celery_app import settings_for

    app = Celery(name)
    app.conf.update(settings_for(config))
    app.conf.broker_url = broker_url
    return app


def _url_for(dbname: str) -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo(ADMIN_URL, dbname=dbname)


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(ADMIN_URL, autocommit=True)


@pytest.fixture(scope="session")
def base_config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The test config; its models dir is filled only by tests that need models."""
    models = tmp_path_factory.getbasetemp() / "models"
    env = dict(os.environ, MLTASKS_MODELS_DIR=str(models))
    return load_config(environ=env)


@pytest.fixture(scope="session")
def models_dir(base_config: Config) -> Path:
    """The 54 demo models, written once per session."""
    from mltasks.models.demo import write_demo_models

    write_demo_models(base_config.models.dir)
    return base_config.models.dir


@pytest.fixture
def all_models_cfg(tmp_path: Path, models_dir: Path) -> Config:
    """A private copy of the session's demo models, free to break; every type loaded."""
    shutil.copytree(models_dir, tmp_path / "models")
    base = load_config(environ={"MLTASKS_CONFIG": str(TESTS / "config" / "test.yaml")})
    return dataclasses.replace(
        base, models=dataclasses.replace(base.models, dir=tmp_path / "models", preload="all")
    )


@pytest.fixture(scope="session")
def fp32_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo models of two archetypes in the FP32 form (``<type>.onnx``): the masters the
    precision variants are built from."""
    from mltasks.models.demo import write_demo_models

    root = tmp_path_factory.mktemp("fp32-models")
    write_demo_models(root, archetypes=["aggressive", "tank"], precision="fp32")
    return root


@pytest.fixture(scope="session")
def template_db(base_config: Config) -> Iterator[str]:
    """A database with the schema applied once; each test copies it."""
    from mltasks.db import init_schema

    name = f"mltasks_tpl_{SESSION}"
    with _admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    cfg = dataclasses.replace(
        base_config, database=dataclasses.replace(base_config.database, url=_url_for(name))
    )
    init_schema(cfg.database)
    yield name
    with _admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


_counter = itertools.count()


@pytest.fixture
def config(base_config: Config, template_db: str) -> Iterator[Config]:
    """A fresh database copied from the template; the process config points at it."""
    from mltasks.models.engine import reset_engine
    from mltasks.serving.process import close_pool

    name = f"mltasks_t_{SESSION}_{next(_counter)}"
    with _admin() as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    cfg = dataclasses.replace(
        base_config, database=dataclasses.replace(base_config.database, url=_url_for(name))
    )
    set_config(cfg)
    reset_engine()
    close_pool()
    _flush_cache_db(cfg)
    yield cfg
    close_pool()
    reset_engine()
    set_config(None)
    with _admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _flush_cache_db(cfg: Config) -> None:
    """Fallback level, heartbeats and cache start empty in every test."""
    import redis

    with redis.Redis.from_url(cfg.redis.db_url(cfg.redis.cache_db)) as r:
        r.flushdb()


def use_config(cfg: Config) -> Config:
    """Switch the process (and the in-process worker) to another config mid-test."""
    from mltasks.models.engine import reset_engine

    set_config(cfg)
    reset_engine()
    return cfg


@pytest.fixture
def bench_db() -> Iterator[str]:
    """A benchmark database of this session's own (several sessions may run on this machine
    at once) on the session's PostgreSQL, the one the `config` fixture uses (the local
    server or the embedded one started above): never skipped, whichever it is."""
    from mltasks.bench.database import drop_database, recreate_database

    url = _url_for(f"mltasks_bench_test_{SESSION}")
    recreate_database(url)
    yield url
    drop_database(url)


@pytest.fixture
def pg(config: Config) -> Iterator[psycopg.Connection[Any]]:
    """A connection to the test database, in autocommit like the game's."""
    with psycopg.connect(config.database.conninfo, autocommit=True) as conn:
        yield conn


@pytest.fixture
def redis_cache(config: Config) -> Iterator[Any]:
    """The cache db, flushed before and after the test."""
    import redis

    r = redis.Redis.from_url(config.redis.db_url(config.redis.cache_db))
    r.flushdb()
    yield r
    r.flushdb()
    r.close()


@pytest.fixture(scope="session")
def celery_app(base_config: Config) -> Any:
    set_config(base_config)
    from mltasks.celery import app

    app.conf.broker_url  # noqa: B018 - load the settings now, from the test config
    import celery.contrib.testing.tasks  # noqa: F401 - start_worker wants celery.ping

    return app


def _purge(app: Any) -> None:
    with app.connection_for_write() as conn:
        for q in ("cpu", "gpu", "rules"):
            conn.default_channel.queue_purge(q)


@pytest.fixture(scope="session")
def session_worker(celery_app: Any, models_dir: Path) -> Iterator[Any]:
    """A real Celery worker consuming `cpu`, in this process (solo pool)."""
    import json

    from celery.contrib.testing.worker import start_worker

    from mltasks.serving.monitor import PROBE_FILE_ENV

    _purge(celery_app)
    # Healthy probe readings: this busy test host's own load must not move the level of
    # the tests (the monitor reads the variable once, at the worker's start).
    drill = Path(tempfile.mkdtemp(prefix="mltasks-probes-")) / "probes.json"
    drill.write_text(json.dumps(HEALTHY_HOST))
    previous = os.environ.get(PROBE_FILE_ENV)
    os.environ[PROBE_FILE_ENV] = str(drill)
    with start_worker(
        celery_app,
        pool="solo",
        concurrency=1,
        perform_ping_check=False,
        queues=["cpu"],
        loglevel="WARNING",
        shutdown_timeout=10,
    ) as worker:
        if previous is None:
            os.environ.pop(PROBE_FILE_ENV, None)
        else:
            os.environ[PROBE_FILE_ENV] = previous
        yield worker
    shutil.rmtree(drill.parent, ignore_errors=True)


@pytest.fixture
def worker(session_worker: Any, config: Config, celery_app: Any) -> Iterator[Any]:
    import redis

    from mltasks.keys import heartbeat

    _purge(celery_app)
    with redis.Redis.from_url(config.redis.db_url(config.redis.cache_db)) as r:
        wait_for(lambda: r.exists(heartbeat("cpu")), 10, "the worker's heartbeat")
    yield session_worker
    _purge(celery_app)


class BridgeThread:
    """A real Bridge running in a thread, stopped at teardown."""

    def __init__(self, cfg: Config, app: Any = None) -> None:
        from bridge.loop import Bridge

        self.bridge = Bridge(cfg, app)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"bridge-{uuid.uuid4().hex[:6]}")

    def _run(self) -> None:
        try:
            self.bridge.run(self.stop)
        except BaseException as exc:  # surfaced in the test, not lost in a thread
            self.error = exc

    def __enter__(self) -> BridgeThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "bridge did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def bridge(config: Config, worker: Any, celery_app: Any) -> Iterator[BridgeThread]:
    with BridgeThread(config, celery_app) as b:
        yield b
