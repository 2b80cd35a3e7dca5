"""A short, bounded `mltasks bench chaos` (issue 11): two bridges, two solo cpu workers, a
rules worker and beat on a private Redis, under one of each fault (kill -9 of Redis, a
bridge, a cpu worker, the rules worker; SIGSTOP of a cpu worker), with map servers on the
game's 100 ms timeout. Every request must get exactly one well-formed answer; the share
in time and the longest run of timeouts after a fault are printed (`pytest -s`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo

from mltasks.bench import chaos
from tests.conftest import ADMIN_URL
from tests.faults.support import missing

pytestmark = pytest.mark.faults


def test_a_short_chaos_run_answers_every_request_once(models_dir: Path, tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        missing("redis-server is not installed")
    opts = chaos.ChaosOptions(
        database_url=make_conninfo(ADMIN_URL, dbname=f"mltasks_bench_chaos_{os.getpid()}"),
        models_dir=models_dir,
        duration_s=20.0,
        clients=3,
        timeout_ms=100,
        fault_every_s=3.0,
        stop_s=1.5,
        # this test host's own load must not move the level
        cpu_load_per_core=1000.0,
    )
    report = chaos.run_chaos(opts, tmp_path, print)
    print("\n" + chaos.summary(report))
    assert chaos.passed(report), chaos.summary(report)
    assert report["settled"]
    assert sum(report["faults"].values()) == len(chaos.FAULTS)
    assert report["decisions"] > 100
    # A goal, loosely: a loaded two-core test host is not a game server.
    assert report["in_time_pct"] >= 98.0, chaos.summary(report)
