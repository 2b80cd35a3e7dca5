"""The launcher: the service's command lines, a child's config and environment, and a
child's handle (a sleeping interpreter stands in for a service process)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any, cast

import psutil
import pytest
import redis

from mltasks.config import load_config
from mltasks.ops.launcher import (
    Child,
    beat_argv,
    bridge_argv,
    exited,
    experience_argv,
    heartbeats,
    service_env,
    stop_children,
    worker_argv,
    write_config,
)
from mltasks.ops.processes import ProcessError, wait_until

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_command_lines_are_the_documented_ones(tmp_path: Path) -> None:
    py = sys.executable
    assert bridge_argv() == [py, "-m", "bridge"]
    assert worker_argv("cpu,rules", "-l", "WARNING") == [
        py, "-m", "celery", "-A", "mltasks", "worker", "-Q", "cpu,rules", "-l", "WARNING",
    ]  # fmt: skip
    assert beat_argv(tmp_path / "s", "-l", "WARNING") == [
        py, "-m", "celery", "-A", "mltasks", "beat", "-l", "WARNING", "-s", str(tmp_path / "s"),
    ]  # fmt: skip
    assert experience_argv() == [py, "-m", "mltasks.experience"]


def test_a_written_config_reads_back_with_its_substitutions(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "child" / "c.yaml",
        {
            "inference": {"max_latency_ms": 3000, "batch_size": 32},
            "caching": {"lookup_levels": [1, 2, 3]},
            "fallback": {"cpu_load_per_core": 1000},
            "monitoring": {"metrics_port": "${PORT:-0}", "bridge_metrics_port": 0},
        },
    )
    cfg = load_config(path, environ={"PORT": "4711"})
    assert (cfg.inference.max_latency_ms, cfg.inference.batch_size) == (3000, 32)
    assert cfg.caching.lookup_levels == (1, 2, 3)
    assert cfg.fallback.cpu_load_per_core == 1000
    assert cfg.monitoring.metrics_port == 4711
    assert load_config(path, environ={}).monitoring.metrics_port == 0


def test_service_env_points_a_child_at_its_config_and_servers(tmp_path: Path) -> None:
    base = {"PATH": "/bin", "MLTASKS_TEST_REDIS_URL": "redis://x", "MLTASKS_REDIS_URL": "r0"}
    env = service_env(
        base,
        config=tmp_path / "c.yaml",
        database_url="postgresql://db",
        redis_url=None,  # left as it is
        models_dir=tmp_path / "models",
        drop=("MLTASKS_TEST_REDIS_URL",),
        PYTHONUNBUFFERED="1",
    )
    assert env == {
        "PATH": "/bin",
        "MLTASKS_REDIS_URL": "r0",
        "MLTASKS_CONFIG": str(tmp_path / "c.yaml"),
        "MLTASKS_DATABASE_URL": "postgresql://db",
        "MLTASKS_MODELS_DIR": str(tmp_path / "models"),
        "PYTHONUNBUFFERED": "1",
    }
    assert base["MLTASKS_TEST_REDIS_URL"] == "redis://x"  # the base is not changed


def test_a_child_is_paused_resumed_and_stopped(tmp_path: Path) -> None:
    child = Child("sleeper", SLEEP, log_path=tmp_path / "logs" / "sleeper.log")
    assert not child.started
    with pytest.raises(ProcessError):
        _ = child.pid
    child.start()
    try:
        proc = psutil.Process(child.pid)
        child.pause()
        wait_until(lambda: proc.status() == psutil.STATUS_STOPPED, 5, "the child stopped")
        child.resume()
        assert exited({"sleeper": child}) == {}
        [end] = stop_children([child, Child("never started", SLEEP)], timeout_s=5)
        assert (end.code, end.killed) == (-signal.SIGTERM, False)
        assert exited({"sleeper": child}) == {"sleeper": -signal.SIGTERM}
        assert (tmp_path / "logs" / "sleeper.log").exists()
    finally:
        child.stop(timeout_s=5)


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_tree_kills_the_child_and_what_it_started() -> None:
    inner = "import time; time.sleep(60)"
    # the child waits on a child of its own, as a Celery worker on its pool
    code = f"import subprocess, sys; subprocess.call([sys.executable, '-c', {inner!r}])"
    child = Child("parent", [sys.executable, "-c", code]).start()
    try:
        grandchildren = wait_until(child.children, 20, "the child's own child")
        child.kill_tree(timeout_s=5)
        assert child.returncode == -signal.SIGKILL
        assert all(_gone(p) for p in grandchildren)
    finally:
        child.stop(timeout_s=5)


class _NoBeat:
    def exists(self, *names: Any) -> int:
        return 0


def test_waiting_for_heartbeats_stops_when_the_worker_exits(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    code = "import sys; print('cannot start'); sys.exit(3)"
    worker = Child("worker", [sys.executable, "-c", code], log_path=log).start()
    try:
        with pytest.raises(ProcessError, match="worker exited \\(3\\)"):
            heartbeats(cast(redis.Redis, _NoBeat()), ["cpu"], [worker], timeout_s=30)
        assert "cannot start" in worker.log_tail()
    finally:
        worker.stop(timeout_s=5)
