"""``mltasks dev``: the whole service on this machine in one command.

Uses the configured PostgreSQL and Redis; applies the schema, writes the demo models
if the models folder has none, then runs a bridge, a worker (queues gpu and cpu) and
beat as child processes until Ctrl-C, which stops every process it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from mltasks.config import Config, get_config
from mltasks.db import create_database_if_missing, init_schema
from mltasks.errors import MLTasksError


def _check_redis(cfg: Config) -> None:
    url = cfg.redis.db_url(cfg.redis.broker_db)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        raise MLTasksError(f"Redis does not answer at redis.url ({exc})") from exc


def _has_models(models_dir: Path) -> bool:
    return models_dir.is_dir() and any(models_dir.glob("*/*.onnx"))


def run_dev(models_dir: str | None = None, admin_url: str | None = None) -> int:
    cfg = get_config()
    if create_database_if_missing(cfg.database, admin_url):
        print(f"created database {cfg.database.safe_dsn}")
    init_schema(cfg.database)
    _check_redis(cfg)
    mdir = Path(models_dir) if models_dir else cfg.models.dir
    if not _has_models(mdir):
        from mltasks.demo_models import write_demo_models

        print(f"writing the demo models into {mdir} ...")
        write_demo_models(mdir)
    env = dict(os.environ, MLTASKS_MODELS_DIR=str(mdir.resolve()))
    beat_dir = Path(tempfile.mkdtemp(prefix="mltasks-beat-"))
    py = sys.executable
    commands = {
        "bridge": [py, "-m", "bridge"],
        "worker": [
            py,
            "-m",
            "celery",
            "-A",
            "mltasks",
            "worker",
            "-Q",
            "gpu,cpu",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ],
        "beat": [
            py,
            "-m",
            "celery",
            "-A",
            "mltasks",
            "beat",
            "--loglevel",
            "WARNING",
            "-s",
            str(beat_dir / "schedule"),
        ],
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, cmd in commands.items():
            procs[name] = subprocess.Popen(cmd, env=env)
        print(
            f"mltasks running against {cfg.database.safe_dsn}: "
            + ", ".join(f"{n} pid {p.pid}" for n, p in procs.items())
            + ". Ctrl-C stops everything."
        )
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        dead = [n for n, p in procs.items() if p.poll() is not None]
        print(f"{', '.join(dead)} exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_all(list(procs.values()))


def stop_all(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM every child, then SIGKILL whatever is still there after `timeout`."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
