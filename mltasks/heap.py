"""What a long-running process does with the objects it made while starting: it takes them
out of the cyclic garbage collector's full passes.

A bridge or worker holds about 80,000 objects once its imports are done (modules, classes,
functions, Celery's app and consumer), and they live as long as the process. Every full
collection walked them all: 53-154 ms in a worker, 42-62 ms in the bridge, measured in
bulk runs (docs/PERFORMANCE.md, 2026-12-07 (night)); every decision waiting on that process
meanwhile was late (the game's timeout is 15 ms). ``gc.freeze`` moves them to the permanent
generation, which collections skip: a full collection then walks what was made since.

Freeze before loading models: the models add about 400 tracked objects, so they stay
collectable, and a version swapped out by a reload is freed as before.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_objects() -> int:
    """Collect what starting left behind, then freeze the rest; returns how many objects
    are frozen (idempotent: a second call freezes what was made since the first)."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug(
        "%d objects made while starting frozen out of the collector",
        frozen,
        extra={"event": "heap_frozen", "objects": frozen},
    )
    return frozen
