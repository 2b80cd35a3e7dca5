"""What the Celery application ``mltasks`` is made of: its task names, its settings (from
our config), the command that starts a worker. The app itself is made once, in
`mltasks.celery` (``celery -A mltasks`` finds it there); importing this builds nothing.
"""

from __future__ import annotations

import sys
from typing import Any

from kombu import Exchange, Queue  # type: ignore[attr-defined]

from mltasks.config import Config
from mltasks.fallback.ladder import LEVEL_QUEUE, Level
from mltasks.fallback.ladder import QUEUES as QUEUES  # one queue per tier of the ladder

# Task names: the bridge sends the first; beat (beat/schedule.py) the periodic ones.
INFER_TASK = "mltasks.infer_batch"
CLEANUP_TASK = "mltasks.cleanup"
RECOVER_TASK = "mltasks.recover"
CANARY_TASK = "mltasks.canary"
# `celery -A mltasks beat` takes its schedule from the beat package's scheduler, named here
# as Celery names pluggable classes, so the core never imports the processes built on it.
BEAT_SCHEDULER = "beat.schedule:Scheduler"
# Where the app reads its settings from when Celery first needs them (from our config).
SETTINGS_MODULE = "mltasks.broker.celery_settings"


def worker_command(queues: str, *options: str, app: str = "mltasks") -> list[str]:
    """``celery -A mltasks worker -Q <queues> <options>`` with this interpreter: the one
    command line the CLI, the benchmark and the tests start workers with (``app``: the
    benchmark's plumbing floor, mltasks.bench.plumbingapp, runs the same worker)."""
    return [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queues, *options]


def control_app() -> Any:
    """An app with the service's broker settings and nothing a worker adds, for commands
    that only talk on the control channel (``models deploy | rollback``): it costs half the
    import of `mltasks.celery` (0.3 against 0.6 CPU seconds here), which on a busy host is
    time the operator waits."""
    from celery import Celery

    made = Celery("mltasks", set_as_current=False)
    made.config_from_object(SETTINGS_MODULE)
    return made


def settings_for(cfg: Config) -> dict[str, Any]:
    """Celery settings derived from the service's config."""
    sentinel = cfg.redis.url.startswith("sentinel://")
    # With Sentinel, kombu finds the master by name (and follows a failover).
    master = {"master_name": cfg.redis.sentinel_master} if sentinel else {}
    return {
        "broker_url": cfg.redis.db_url(cfg.redis.broker_db),
        # kombu's Redis transport, minus a client object built per command (.transport).
        "broker_transport": "mltasks.broker.transport:"
        + ("SentinelTransport" if sentinel else "Transport"),
        "broker_transport_options": {
            **master,
            # A killed worker's unacked batch comes back after this, not the 1 h default.
            "visibility_timeout": cfg.redis.visibility_timeout_s,
            # ... which needs the sweep for abandoned batches to run that often too
            # (kombu's default looks only every 10 x 10 s).
            "unacked_restore_interval": max(1, cfg.redis.visibility_timeout_s // 3),
            "unacked_restore_throttle": 1,
            "socket_timeout": cfg.redis.socket_timeout_s,
            "socket_connect_timeout": cfg.redis.socket_timeout_s,
            # A consumer whose BRPOP connection went silent (a partition: no FIN, no RST)
            # reconnects within brpop_timeout + 2 x this, not kombu's 51 s (tests/scale).
            "health_check_interval": 2,
            # infer_batch skips kombu's unacked bookkeeping: two round trips per batch whose
            # only use is a redelivery long after the deadline (.transport).
            "untracked_tasks": (INFER_TASK,),
        },
        "broker_connection_retry_on_startup": True,
        "broker_pool_limit": 10,
        # Never pickle: a broker message must not be able to run code.
        "task_serializer": "msgpack",
        "accept_content": ["msgpack", "json"],
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Batches are short: one in flight per process keeps a slow one from holding others.
        "worker_prefetch_multiplier": cfg.worker.prefetch_multiplier,
        # Back on the broker within ~1 s of its return, not kombu's 2 s doubling to 30 s.
        "worker_consumer": "mltasks.serving.bootsteps:QuickReconnectConsumer",
        "worker_concurrency": cfg.worker.concurrency,
        "task_default_queue": LEVEL_QUEUE[Level.CPU],
        "task_queues": tuple(Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES),
        "task_soft_time_limit": 10,
        "task_time_limit": 20,
        "worker_disable_rate_limits": True,
        # Flower's task list is made of task events. They cost a publish per task and
        # state, so workers start without them and Flower switches them on while it
        # watches (its enable_events); no "sent" event, which would cost the bridge too.
        "worker_send_task_events": cfg.monitoring.task_events,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
        "beat_scheduler": BEAT_SCHEDULER,
    }
