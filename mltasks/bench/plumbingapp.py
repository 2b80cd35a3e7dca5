"""The plumbing floor's workers: ``celery -A mltasks.bench.plumbingapp worker -Q cpu``.

The service's app (`mltasks.celery`), with the batch task's answering path swapped for
`mltasks.bench.plumbingfloor.answer_fixed` on import. Only a worker the benchmark starts
imports this module: imported anywhere else, it would change that process's batch task.
"""

from __future__ import annotations

from mltasks.bench.plumbingfloor import answer_fixed
from mltasks.celery import app
from mltasks.serving import batch

__all__ = ["app"]

batch.answer_batch = answer_fixed  # type: ignore[attr-defined]
