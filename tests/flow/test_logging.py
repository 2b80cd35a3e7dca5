"""Logs: JSON or text, a stable `event` on every record, and never a secret."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mltasks.config import Config, LoggingConfig
from mltasks.logs import PER_TASK_LOGGERS, JsonFormatter, TextFormatter, configure_logging
from mltasks.ops.launcher import (
    Child,
    bridge_argv,
    service_env,
    stop_children,
    worker_argv,
    write_config,
)
from tests import game
from tests.conftest import wait_for

SECRET = "Sup3r-S3cret-pw-4711"


def record(**extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("mltasks.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_lines_carry_event_and_extras() -> None:
    doc = json.loads(JsonFormatter().format(record(event="batch_answered", rows=3)))
    assert (doc["event"], doc["msg"], doc["rows"], doc["level"]) == (
        "batch_answered",
        "hello you",
        3,
        "INFO",
    )
    # A record without an event still has one: the logger's name.
    assert json.loads(JsonFormatter().format(record()))["event"] == "mltasks.x"
    assert "event=batch_answered" in TextFormatter().format(record(event="batch_answered"))


def test_configure_logging_picks_the_format(capsys: Any) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(LoggingConfig(level="INFO", format="json"))
        logging.getLogger("mltasks.t").info("x", extra={"event": "probe"})
        assert json.loads(capsys.readouterr().err.strip())["event"] == "probe"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_no_secret_reaches_the_logs(config: Config, models_dir: Path, tmp_path: Path) -> None:
    params = conninfo_to_dict(config.database.conninfo)
    url = make_conninfo(config.database.conninfo, password=SECRET)  # trust auth ignores it
    bad_url = make_conninfo(url, dbname=f"{params['dbname']}_missing")
    cfg = write_config(
        tmp_path / "json.yaml",
        {
            "logging": {"level": "DEBUG", "format": "json"},
            "redis": {
                "url": "${MLTASKS_TEST_REDIS_URL:-redis://127.0.0.1:6379}",
                "broker_db": 13,
                "cache_db": 14,
            },
            # this busy test host's own load must not move the level (issue 11: it does now)
            "fallback": {"cpu_load_per_core": 1000},
            "monitoring": {"metrics_port": 0, "bridge_metrics_port": 0},
        },
    )
    env = service_env(
        config=cfg,
        database_url=url,
        redis_url=config.redis.url,
        models_dir=models_dir,
        ML_DB_PASSWORD=SECRET,
    )
    log_path = tmp_path / "all.log"
    worker = worker_argv("cpu", "-l", "DEBUG", "--without-gossip", "--without-mingle")
    procs = [
        Child("bridge", bridge_argv(), env=env, log_path=log_path, own_session=False),
        Child("worker", worker, env=env, log_path=log_path, own_session=False),
        # A bridge that cannot reach its database logs the error, and retries.
        Child(
            "bad bridge",
            bridge_argv(),
            env=dict(env, MLTASKS_DATABASE_URL=bad_url),
            log_path=log_path,
            own_session=False,
        ),
    ]
    try:
        for p in procs:
            p.start()
        with psycopg.connect(config.database.conninfo, autocommit=True) as pg:
            wait_for(
                lambda: game.answered_by_model(pg, [0.5] * 64, 3000, archetype="mage"),
                60,
                "the worker's answers",
            )
            game.decide(pg, [0.5] * 10, timeout_ms=3000)  # a bad row: a logged reason
        wait_for(lambda: b"bridge_db_error" in log_path.read_bytes(), 20, "the error log")
    finally:
        stop_children(procs)
    text = log_path.read_text()
    assert SECRET not in text
    docs = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    events = [doc["event"] for doc in docs]
    assert {"bridge_connected", "bridge_db_error", "models_loaded"} <= set(events)
    # At DEBUG, Celery's per-task lines are there, as DEBUG.
    per_task = [d for d in docs if d["logger"] in PER_TASK_LOGGERS]
    assert any(" received" in d["msg"] for d in per_task), text[-3000:]
    assert any(" succeeded in " in d["msg"] for d in per_task), text[-3000:]
    assert {d["level"] for d in per_task} == {"DEBUG"}


def test_workers_log_no_line_per_task_at_info(
    config: Config, models_dir: Path, tmp_path: Path
) -> None:
    """At INFO (the default), a worker answering batch after batch logs nothing per task:
    Celery's "received" and "succeeded" lines are DEBUG; the counts are in the metrics."""
    cfg = write_config(
        tmp_path / "info.yaml",
        {
            "logging": {"level": "INFO", "format": "text"},
            # the service waits as long as this test's game does: a batch slowed by this
            # busy host is answered by the model, not rescued with 255 at 80% of 15 ms
            "inference": {"max_latency_ms": 3000},
            "redis": {"broker_db": 13, "cache_db": 14},
            # this busy test host's own load must not move the level to the rules
            "fallback": {"cpu_load_per_core": 1000},
            "monitoring": {"metrics_port": 0, "bridge_metrics_port": 0},
        },
    )
    env = service_env(
        config=cfg,
        database_url=config.database.conninfo,
        redis_url=config.redis.url,
        models_dir=models_dir,
    )
    log_path = tmp_path / "worker.log"
    worker = worker_argv("cpu", "-l", "INFO", "--without-gossip", "--without-mingle")
    procs = [
        Child("bridge", bridge_argv(), env=env, log_path=log_path, own_session=False),
        Child("worker", worker, env=env, log_path=log_path, own_session=False),
    ]
    try:
        for p in procs:
            p.start()
        with psycopg.connect(config.database.conninfo, autocommit=True) as pg:
            wait_for(
                lambda: game.answered_by_model(pg, [0.5] * 64, 3000, archetype="tank"),
                60,
                "the worker's answers",
            )
            size_before = log_path.stat().st_size
            for i in range(30):
                _, answer = game.decide(pg, [i / 30] * 64, timeout_ms=3000)
                assert answer is not None and answer[0] != 255
            grown = log_path.stat().st_size - size_before
    finally:
        stop_children(procs)
    text = log_path.read_text()
    assert "] received" not in text, text[-3000:]
    assert " succeeded in " not in text
    assert grown == 0, text[-3000:]  # 30 answered requests, not a byte of log


def test_per_task_loggers_follow_the_configured_level() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(LoggingConfig(level="INFO"))
        assert not any(logging.getLogger(n).isEnabledFor(logging.INFO) for n in PER_TASK_LOGGERS)
        assert all(logging.getLogger(n).isEnabledFor(logging.ERROR) for n in PER_TASK_LOGGERS)
        configure_logging(LoggingConfig(level="DEBUG"))
        assert all(logging.getLogger(n).isEnabledFor(logging.INFO) for n in PER_TASK_LOGGERS)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        configure_logging(LoggingConfig(level="WARNING"))
        root.handlers[:] = saved[0]
