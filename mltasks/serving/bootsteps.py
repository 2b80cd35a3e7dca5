"""What a Celery worker adds to itself: the monitor thread and the consuming flag
(bootsteps), and a consumer that gets back on a lost broker within a second.
"""

from __future__ import annotations

import os
from typing import Any

from celery import bootsteps
from celery.worker.consumer import Consumer

from mltasks.config import get_config
from mltasks.fallback.ladder import JOBS_QUEUE
from mltasks.serving.monitor import DatabaseCheck, Monitor, host_probe

QUEUES_ENV = "MLTASKS_WORKER_QUEUES"


def worker_queues() -> list[str]:
    """The queues this worker consumes (children learn them from the environment)."""
    return [q for q in os.environ.get(QUEUES_ENV, "").split(",") if q]


class MonitorStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Starts the monitor with the worker, stops it on shutdown."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        queues = sorted(worker.app.amqp.queues.consume_from or [JOBS_QUEUE])
        os.environ[QUEUES_ENV] = ",".join(queues)
        self.queues = queues
        self.monitor: Monitor | None = None

    def start(self, worker: Any) -> None:
        cfg = get_config()

        def connected() -> bool:
            consumer = getattr(worker, "consumer", None)
            conn = getattr(consumer, "connection", None)
            consuming = getattr(consumer, CONSUMING_FLAG, False)
            return bool(consuming and conn is not None and conn.connected)

        self.monitor = Monitor(
            cfg,
            self.queues,
            probe=host_probe(cfg),
            connected=connected,
            database=DatabaseCheck(),
            check_models=True,
        )
        self.monitor.start()

    def stop(self, worker: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None


CONSUMING_FLAG = "mltasks_consuming"


class ConsumingStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Marks the consumer as reading its queues: started after Celery's task consumer
    (so after mingle, which holds a (re)connected worker back about a second), stopped
    first when the connection is lost. The monitor beats only while it is set."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, c: Any) -> None:
        setattr(c, CONSUMING_FLAG, True)

    def stop(self, c: Any) -> None:
        setattr(c, CONSUMING_FLAG, False)

    def shutdown(self, c: Any) -> None:
        setattr(c, CONSUMING_FLAG, False)


class QuickReconnectConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, retrying a lost broker every 0.2-1 s instead of 2 s doubling to 30 s,
    and without "mingle".

    While it is away the bridge answers with the rules; every second of reconnect delay
    after the broker is back is a second of batches sent elsewhere. Mingle (asking the
    other workers for their revoked tasks and clock at every (re)connection) holds the
    consumer back about a second each time, for nothing this service uses: no task is ever
    revoked. It stays off whatever the command line says.
    """

    def __init__(self, *args: Any, worker_options: Any = None, **kwargs: Any) -> None:
        options = {**dict(worker_options or {}), "without_mingle": True}
        super().__init__(*args, worker_options=options, **kwargs)

    def ensure_connected(self, conn: Any) -> Any:
        original = conn.ensure_connection

        def quick(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("interval_start", 0.2)
            kwargs.setdefault("interval_step", 0.2)
            kwargs.setdefault("interval_max", 1.0)
            return original(*args, **kwargs)

        conn.ensure_connection = quick
        try:
            return super().ensure_connected(conn)
        finally:
            conn.ensure_connection = original
