"""A private world for fallback tests: its own broker and cache dbs (13, 14), so the
session's in-process worker never consumes its batches nor beats its heartbeats, and
real worker processes that a test can start, kill and restart."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from mltasks.broker.celery_app import settings_for, worker_command
from mltasks.config import Config
from mltasks.fallback.levels import LevelStore
from mltasks.keys import heartbeat
from mltasks.ops.dev import stop_all
from tests import conftest
from tests.conftest import BridgeThread, wait_for

BROKER_DB, CACHE_DB = 13, 14
# A healthy host with a GPU (1 of 8 GiB used), so every tier of the ladder can serve.
HEALTHY_HOST: dict[str, Any] = dict(
    conftest.HEALTHY_HOST,
    gpu_present=True,
    vram_used_bytes=1 << 30,
    vram_total_bytes=8 << 30,
    gpu_status="ok",
)


class World:
    def __init__(
        self, config: Config, tmp_path: Path, models_dir: Path, layout: str = "encoder"
    ) -> None:
        fb = dataclasses.replace(
            config.fallback,
            heartbeat_interval_ms=200,
            heartbeat_ttl_ms=800,
            probe_interval_s=0.2,
            recovery_hysteresis_s=0.0,
            recovery_backoff_s=0.3,
            recovery_backoff_max_s=2.0,
            canary_timeout_s=3.0,
            cpu_load_per_core=1000.0,  # real probes must not move the level in tests
            queue_lag_ms=60_000,
        )
        self.cfg = dataclasses.replace(
            config,
            redis=dataclasses.replace(config.redis, broker_db=BROKER_DB, cache_db=CACHE_DB),
            fallback=fb,
            inference=dataclasses.replace(config.inference, max_latency_ms=3000, lease_ms=1000),
            state=dataclasses.replace(config.state, layout=layout),  # type: ignore[arg-type]
        )
        self.models_dir = models_dir
        self.tmp = tmp_path
        self.config_file = tmp_path / "world.yaml"
        self.config_file.write_text(
            f"inference:\n  max_latency_ms: 3000\n  lease_ms: 1000\n  batch_size: 32\n"
            f"redis:\n  broker_db: {BROKER_DB}\n  cache_db: {CACHE_DB}\n"
            f"  visibility_timeout_s: 5\n"
            f"fallback:\n  heartbeat_interval_ms: 200\n  heartbeat_ttl_ms: 800\n"
            f"  probe_interval_s: 0.2\n  recovery_hysteresis_s: 0\n  recovery_backoff_s: 0.3\n"
            f"  recovery_backoff_max_s: 2\n  canary_timeout_s: 3\n  cpu_load_per_core: 1000\n"
            f"  queue_lag_ms: 60000\n"
            f"monitoring:\n  metrics_port: 0\n  bridge_metrics_port: 0\n"
            f"logging:\n  level: WARNING\n"
            f"state:\n  layout: {layout}\n"
        )
        self.app = Celery("world")
        self.app.conf.update(settings_for(self.cfg))
        self.redis = redis.Redis.from_url(self.cfg.redis.db_url(CACHE_DB))
        self.store = LevelStore(self.cfg)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.probe_file = tmp_path / "probes.json"
        self.set_probes()
        self._flush()

    def _flush(self) -> None:
        self.redis.flushdb()
        with redis.Redis.from_url(self.cfg.redis.db_url(BROKER_DB)) as b:
            b.flushdb()

    def set_probes(self, **readings: Any) -> None:
        """What every world worker's probes read from now on (a healthy GPU host by default)."""
        doc = dict(HEALTHY_HOST, **readings)
        tmp = self.probe_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.probe_file)

    def start_worker(
        self, queues: str, models_dir: Path | None = None, concurrency: int = 1
    ) -> subprocess.Popen[bytes]:
        env = dict(
            os.environ,
            MLTASKS_CONFIG=str(self.config_file),
            MLTASKS_DATABASE_URL=self.cfg.database.conninfo,
            MLTASKS_REDIS_URL=self.cfg.redis.url,
            MLTASKS_MODELS_DIR=str(models_dir or self.models_dir),
            MLTASKS_PROBE_READINGS=str(self.probe_file),
        )
        proc = subprocess.Popen(
            worker_command(
                queues,
                "--pool",
                "prefork",
                "--concurrency",
                str(concurrency),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"{queues.replace(',', '-')}-{len(self.procs)}@test",
                "-l",
                "WARNING",
            ),
            env=env,
        )
        self.procs.append(proc)
        for q in queues.split(","):

            def up(q: str = q) -> bool:
                return self.live(q) or proc.poll() is not None

            wait_for(up, 60, f"{q} heartbeat")
            assert proc.poll() is None, "worker died at start"
        return proc

    def start_beat(self) -> subprocess.Popen[bytes]:
        """`celery -A mltasks beat`: recovery lifts the level back up (every 5 s here)."""
        env = dict(
            os.environ,
            MLTASKS_CONFIG=str(self.config_file),
            MLTASKS_DATABASE_URL=self.cfg.database.conninfo,
            MLTASKS_REDIS_URL=self.cfg.redis.url,
            MLTASKS_MODELS_DIR=str(self.models_dir),
        )
        cmd = [sys.executable, "-m", "celery", "-A", "mltasks", "beat", "-l", "WARNING"]
        proc = subprocess.Popen([*cmd, "-s", str(self.tmp / "beat-schedule")], env=env)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """kill -9 the worker's main process and its pool children."""
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

    def live(self, queue: str) -> bool:
        return bool(self.redis.exists(heartbeat(queue)))

    def bridge(self) -> BridgeThread:
        return BridgeThread(self.cfg, self.app)

    def close(self) -> None:
        stop_all(self.procs, timeout=10)
        self._flush()
        self.redis.close()

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
