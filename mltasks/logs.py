"""Structured logging: every record carries a stable ``event`` field; JSON or text."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from mltasks.config import LoggingConfig

# Attributes every LogRecord has; anything else came from `extra=` and is ours to print.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", record.name),
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD and k != "event"
        )
        event = getattr(record, "event", "-")
        base = f"{self.formatTime(record)} {record.levelname:<7} {record.name} event={event}"
        line = f"{base} {record.getMessage()}" + (f" [{extras}]" if extras else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


# Celery's lines per task ("Task mltasks.infer_batch[...] received", "... succeeded in
# 0.004s: None"): INFO in Celery, two for every batch, about 350 bytes a request at scale.
# Here they are DEBUG: shown (as DEBUG) only when logging.level is DEBUG. What they counted
# is in the metrics (ml_requests_total, ml_batch_size, ml_inference_latency_seconds).
PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.worker.request")


class _PerTaskAsDebug(logging.Filter):
    """Relabels a per-task INFO record as DEBUG (its logger only lets it through at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_PER_TASK_FILTER = _PerTaskAsDebug()


def quiet_per_task_lines(level: int | str) -> None:
    """Celery's per-task loggers at WARNING unless ``level`` is DEBUG.

    Levels, not a filter alone: Celery reads ``isEnabledFor(INFO)`` once when it builds a
    task's tracer, and then does not even format the lines.
    """
    debug = logging.getLevelName(level) if isinstance(level, str) else level
    for name in PER_TASK_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.NOTSET if debug == logging.DEBUG else logging.WARNING)
        if _PER_TASK_FILTER not in logger.filters:
            logger.addFilter(_PER_TASK_FILTER)


def configure_logging(cfg: LoggingConfig) -> None:
    """Install our formatter on the root logger (called once per process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if cfg.format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.level)
    quiet_per_task_lines(cfg.level)
