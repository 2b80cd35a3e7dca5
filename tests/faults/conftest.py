"""Fixtures of the fault suite: a private redis-server per test and the service's
processes on it, always stopped at teardown (the helpers live in tests/faults/support.py,
which tests/flow/test_redis_outage.py shares)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.support import Service, Settings, redis_server

__all__ = ["redis_server"]  # a fixture shared with tests/flow/test_redis_outage.py


@pytest.fixture
def make_service(tmp_path: Path, models_dir: Path) -> Iterator[Callable[..., Service]]:
    """Service(database_url, redis_url, settings): every one made is closed at teardown."""
    made: list[Service] = []

    def make(database_url: str, redis_url: str, settings: Settings | None = None) -> Service:
        svc = Service(
            tmp_path / f"service-{len(made)}",
            database_url=database_url,
            redis_url=redis_url,
            models_dir=models_dir,
            settings=settings or Settings(),
        )
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close()
