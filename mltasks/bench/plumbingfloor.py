"""The plumbing floor: the service as deployed, with the broker floor's answer.

Its bridge (``python -m bridge``), its Celery task and its workers (``celery -A
mltasks.bench.plumbingapp worker -Q cpu``: the service's app, bootsteps and
preload) run unchanged, and so do the answer statement, the metrics, the fallback
ladder's report, the rescue and the leases. Only the answering path of the batch task
(`mltasks.serving.batch`'s ``answer_batch``: validation, cache lookup, models, fusion,
and the cache write after the answers) is replaced by what the broker floor's worker
does (`mltasks.bench.brokerfloor.decide`: the states' bytes, a fixed 64x10 matmul, the
argmax). So, in one run:

- service / plumbing floor: what answering costs (the models, the fusion, the cache);
- plumbing floor / broker floor: what the service's plumbing costs above the design
  card's minimal build.

The workers run the app of `mltasks.bench.plumbingapp`, which swaps this answer in when it
is imported; importing this module changes nothing (the tests do). Nothing here is imported
by the service; the benchmark starts it (``--floor plumbing``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mltasks.bench.brokerfloor import decide
from mltasks.serving.inference import Outcome
from mltasks.serving.records import Answer, as_rows, traditional

MODEL = "floor/plumbing"


def answer_fixed(rows: Sequence[Sequence[Any]], *_: Any, **__: Any) -> Outcome:
    """`answer_batch`'s place: the broker floor's tiny model on the rows' state bytes; a
    row whose state is not 64 float4 values gets 255. Nothing is cached."""
    typed = as_rows(rows)
    states = [r.state_vector if type(r.state_vector) is bytes else None for r in typed]
    actions, confidences = decide(states)
    return Outcome(
        [
            Answer(r.request_id, a, round(c, 4), "model", "completed", MODEL)
            if a != 255
            else traditional(r.request_id, "state_not_float4")
            for r, a, c in zip(typed, actions, confidences, strict=True)
        ],
        [],
    )
