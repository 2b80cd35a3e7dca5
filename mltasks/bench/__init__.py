"""Benchmarks: the emulated map servers (mltasks.game) against the service and a minimal floor.

Why a floor: the gateway's round trip through PostgreSQL costs time whatever answers it;
running the same clients against a responder that does nothing but answer shows what
the service itself adds.
"""

from mltasks.errors import MLTasksError


class BenchError(MLTasksError):
    """The benchmark could not run."""
