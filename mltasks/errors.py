"""One base exception for the service; driver errors are wrapped at the boundary."""

from __future__ import annotations


class MLTasksError(Exception):
    """An mltasks error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(MLTasksError):
    """The configuration is invalid."""


class DatabaseError(MLTasksError):
    """PostgreSQL could not be reached or refused a statement."""


class BrokerError(MLTasksError):
    """The Celery broker could not accept a batch."""


class ModelError(MLTasksError):
    """A model file could not be loaded or did not honour the model contract."""
