"""What ``mltasks dev`` sets up before its children start: its options, the servers (private
embedded ones, or the configured ones with ``--use-configured``) and the demo models."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from mltasks.config import Config
from mltasks.db import create_database_if_missing, init_schema
from mltasks.errors import MLTasksError
from mltasks.fallback.ladder import QUEUES
from mltasks.ops.embedded import EmbeddedPostgres, EmbeddedRedis, postgres_answers

log = logging.getLogger("mltasks.ops.dev")  # dev's records, whichever module writes them


@dataclass(frozen=True, slots=True)
class DevOptions:
    models_dir: Path | None = None
    # Superuser connection that creates the role and database when missing (configured
    # server only); default: the same server as user postgres, database postgres.
    admin_url: str | None = None
    use_configured: bool = False  # the configured servers, not private ones
    data_dir: Path = Path(".mltasks-dev")
    connect_timeout_s: float = 1.0
    queues: str = ",".join(QUEUES)
    load: bool = False
    load_clients: int = 4
    load_timeout_ms: int = 100
    live: bool | None = None  # the status screen; None: when stdout is a terminal
    ready_timeout_s: float = 120.0


@dataclass(slots=True)
class Servers:
    """The servers in use; the URLs are set only for embedded ones (children get them)."""

    database_url: str | None = None
    redis_url: str | None = None
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.postgres is not None and self.postgres.pid is not None:
            out["postgres"] = self.postgres.pid
        if self.redis is not None and self.redis.pid is not None:
            out["redis"] = self.redis.pid
        return out


def default_admin_url(cfg: Config) -> str:
    """The configured server as user ``postgres`` on database ``postgres``, no password."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = {k: v for k, v in conninfo_to_dict(cfg.database.conninfo).items() if v is not None}
    params.pop("password", None)
    params.update(dbname="postgres", user="postgres")
    return make_conninfo("", **params)


def _embedded_db_url(pg: EmbeddedPostgres, cfg: Config) -> str:
    """The configured database and role names, on the embedded server."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(cfg.database.conninfo)
    return pg.url(
        dbname=str(params.get("dbname") or "ragnarok_ml"),
        user=str(params.get("user") or "ml_user"),
    )


def start_servers(cfg: Config, opts: DevOptions, stack: contextlib.ExitStack) -> Servers:
    """Private servers (or, with ``use_configured``, the configured ones, which must
    answer within ``connect_timeout_s``); stopping is registered on ``stack``."""
    servers = Servers()
    if opts.use_configured:
        return _configured_servers(cfg, opts)
    pg = EmbeddedPostgres(opts.data_dir / "pg")
    stack.callback(pg.stop)
    admin = pg.start()
    servers.postgres = pg
    servers.database_url = _embedded_db_url(pg, cfg)
    db = dataclasses.replace(cfg.database, url=servers.database_url)
    create_database_if_missing(db, admin)
    init_schema(db)
    rs = EmbeddedRedis(opts.data_dir / "redis")
    stack.callback(rs.stop)
    servers.redis_url = rs.start()
    servers.redis = rs
    return servers


def _configured_servers(cfg: Config, opts: DevOptions) -> Servers:
    """``--use-configured``: the configured PostgreSQL and Redis, announced as such."""
    timeout = opts.connect_timeout_s
    if not postgres_answers(cfg.database.conninfo, timeout):
        raise MLTasksError(
            f"--use-configured: cannot connect to PostgreSQL at {cfg.database.safe_dsn} "
            f"(nothing answered within {timeout:g} s)"
        )
    print(
        f"--use-configured: PostgreSQL {cfg.database.safe_dsn}, "
        f"Redis {_redis_where(cfg)} (broker db {cfg.redis.broker_db}, "
        f"cache db {cfg.redis.cache_db})",
        flush=True,
    )
    admin = opts.admin_url or default_admin_url(cfg)
    if create_database_if_missing(cfg.database, admin):
        print(f"created database {cfg.database.safe_dsn}", flush=True)
    init_schema(cfg.database)
    _check_redis(cfg)
    log.info(
        "using the configured PostgreSQL at %s and Redis at %s",
        cfg.database.safe_dsn,
        _redis_where(cfg),
        extra={"event": "dev_configured_servers"},
    )
    return Servers()


def _redis_where(cfg: Config) -> str:
    from mltasks.ops.status_sources import _redis_target

    return _redis_target(cfg)


def _check_redis(cfg: Config) -> None:
    client = cfg.redis.client(cfg.redis.broker_db, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise MLTasksError(f"Redis does not answer at redis.url ({exc})") from exc
    finally:
        client.close()


def with_servers(cfg: Config, servers: Servers) -> Config:
    """``cfg`` pointed at the embedded servers (this process reads status through it)."""
    if servers.database_url:
        cfg = dataclasses.replace(
            cfg, database=dataclasses.replace(cfg.database, url=servers.database_url)
        )
    if servers.redis_url:
        cfg = dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=servers.redis_url))
    return cfg


# --- models -------------------------------------------------------------------------------


def has_models(models_dir: Path) -> bool:
    """The folder holds models already: dev writes the demo ones only into an empty one."""
    return models_dir.is_dir() and any(models_dir.glob("*/*.onnx"))


class ModelWriter:
    """Writes the demo models in a thread, into a scratch folder moved in when complete.

    The servers start meanwhile (writing takes seconds of CPU); an interrupted write
    leaves no partial models folder that a later run would take as complete.
    """

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="mltasks-dev-models", daemon=True)

    def start(self) -> ModelWriter:
        print(f"writing the demo models into {self.models_dir} ...", flush=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        from mltasks.models.demo import write_demo_models

        self.models_dir.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(
            tempfile.mkdtemp(prefix=f".{self.models_dir.name}-", dir=self.models_dir.parent)
        )
        try:
            t0 = time.monotonic()
            write_demo_models(scratch)
            self.models_dir.mkdir(parents=True, exist_ok=True)
            for part in sorted(scratch.iterdir()):
                target = self.models_dir / part.name
                if target.exists():
                    shutil.rmtree(target)
                part.rename(target)
            log.info(
                "demo models written in %.1f s",
                time.monotonic() - t0,
                extra={"event": "dev_models_written", "dir": str(self.models_dir)},
            )
        except BaseException as exc:  # surfaced by wait() in the main thread
            self.error = exc
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def wait(self) -> None:
        """Until the models are there; raises what the writer raised."""
        while self.thread.is_alive():
            self.thread.join(0.2)  # short joins: a Ctrl-C still reaches the main thread
        if self.error is not None:
            raise MLTasksError(f"writing the demo models failed: {self.error}") from self.error
