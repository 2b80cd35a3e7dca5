"""A private world for fallback tests: its own broker and cache dbs (13, 14), so the
session's in-process worker never consumes its batches nor beats its heartbeats, and
real worker processes that a test can start, kill and restart."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from mltasks.broker.celery_app import settings_for
from mltasks.config import Config
from mltasks.fallback.levels import LevelStore
from mltasks.keys import heartbeat
from mltasks.ops.launcher import (
    Child,
    beat_argv,
    heartbeats,
    service_env,
    stop_children,
    worker_argv,
    write_config,
)
from tests import conftest
from tests.conftest import BridgeThread

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
        self.config_file = write_config(
            tmp_path / "world.yaml",
            {
                "inference": {"max_latency_ms": 3000, "lease_ms": 1000, "batch_size": 32},
                "redis": {"broker_db": BROKER_DB, "cache_db": CACHE_DB, "visibility_timeout_s": 5},
                "fallback": {
                    "heartbeat_interval_ms": 200,
                    "heartbeat_ttl_ms": 800,
                    "probe_interval_s": 0.2,
                    "recovery_hysteresis_s": 0,
                    "recovery_backoff_s": 0.3,
                    "recovery_backoff_max_s": 2,
                    "canary_timeout_s": 3,
                    "cpu_load_per_core": 1000,
                    "queue_lag_ms": 60000,
                },
                "monitoring": {"metrics_port": 0, "bridge_metrics_port": 0},
                "logging": {"level": "WARNING"},
                "state": {"layout": layout},
            },
        )
        self.app = Celery("world")
        self.app.conf.update(settings_for(self.cfg))
        self.redis = redis.Redis.from_url(self.cfg.redis.db_url(CACHE_DB))
        self.store = LevelStore(self.cfg)
        self.procs: list[Child] = []
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

    def _env(self, models_dir: Path | None = None) -> dict[str, str]:
        return service_env(
            config=self.config_file,
            database_url=self.cfg.database.conninfo,
            redis_url=self.cfg.redis.url,
            models_dir=models_dir or self.models_dir,
        )

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        """In the test's process group, its output on the test's (pytest captures it)."""
        child = Child(name, argv, env=env, own_session=False).start()
        self.procs.append(child)
        return child

    def start_worker(
        self, queues: str, models_dir: Path | None = None, concurrency: int = 1
    ) -> Child:
        """A prefork worker on ``queues``, once it beats for each of them."""
        name = f"{queues.replace(',', '-')}-{len(self.procs)}@test"
        argv = worker_argv(
            queues, "--pool", "prefork", "--concurrency", str(concurrency),
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", name, "-l", "WARNING",
        )  # fmt: skip
        env = dict(self._env(models_dir), MLTASKS_PROBE_READINGS=str(self.probe_file))
        child = self._start(name, argv, env)
        heartbeats(self.redis, queues.split(","), [child], timeout_s=60)
        return child

    def start_beat(self) -> Child:
        """`celery -A mltasks beat`: recovery lifts the level back up (every 5 s here)."""
        argv = beat_argv(self.tmp / "beat-schedule", "-l", "WARNING")
        return self._start("beat", argv, self._env())

    def kill(self, child: Child) -> None:
        """kill -9 the worker's main process and its pool children."""
        child.kill_tree()

    def live(self, queue: str) -> bool:
        return bool(self.redis.exists(heartbeat(queue)))

    def bridge(self) -> BridgeThread:
        return BridgeThread(self.cfg, self.app)

    def close(self) -> None:
        stop_children(self.procs, timeout_s=10)
        self._flush()
        self.redis.close()

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
