"""The benchmark's named statements (sql/bench.sql), parsed once like sql/queries.sql."""

from __future__ import annotations

from functools import cache
from typing import LiteralString

from mltasks.sql import SQL_DIR, parse_queries


@cache
def _queries() -> dict[str, str]:
    return parse_queries((SQL_DIR / "bench.sql").read_text())


def bench_query(name: str) -> LiteralString:
    """The statement called ``name`` in sql/bench.sql (our own file: as literal as code)."""
    return _queries()[name]
