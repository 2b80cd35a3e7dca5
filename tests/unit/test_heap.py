"""The start-up heap frozen out of the collector (mltasks.heap), in a fresh interpreter:
freezing pytest's own heap would keep its garbage for the rest of the run."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import gc, json
import mltasks.celery, mltasks.serving.batch  # what a worker has imported when it starts
from mltasks.heap import freeze_startup_objects
before = len(gc.get_objects())
frozen = freeze_startup_objects()
print(json.dumps({"before": before, "frozen": frozen, "left": len(gc.get_objects())}))
"""


def test_a_workers_start_up_objects_leave_the_collectors_full_passes() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120
    )
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["before"] > 20_000  # imports alone: tens of thousands
    assert counts["frozen"] > 0.9 * counts["before"]
    assert counts["left"] < 0.01 * counts["before"]  # what a full collection still walks
