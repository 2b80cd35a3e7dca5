"""Child processes of a run (responders), started as `mltasks.ops.launcher` starts the
service's, and waiting until they answer.

Each child gets its own session, so a Ctrl-C in the terminal reaches only the benchmark,
which then stops its children itself: SIGTERM, then SIGKILL after a timeout, including
grandchildren (a Celery worker's pool).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import psutil

from mltasks.bench import BenchError
from mltasks.bench.cpucost import app_name
from mltasks.bench.queries import bench_query
from mltasks.game import connect_as_game, insert_sql, state_sql
from mltasks.ops.launcher import Child
from mltasks.ops.processes import log_tail

STOP_TIMEOUT_S = 15.0


class ManagedProcess(Child):
    """A benchmark's child (`mltasks.ops.launcher.Child`): in a session of its own, its
    PostgreSQL connections saying whose they are (mltasks.bench.cpucost), and a
    BenchError with the end of its log when it has exited."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        env = dict(os.environ if env is None else env)
        env["PGAPPNAME"] = app_name(name)
        super().__init__(name, list(argv), env=env, log_path=log_path, cwd=cwd)

    def check(self) -> None:
        """Raise BenchError, with the end of its log, if the process has exited."""
        if not self.started or self.poll() is None:
            return
        raise BenchError(
            f"{self.name} exited with code {self.returncode}; "
            f"end of {self.log_path}:\n{tail(self.log_path)}"
        )

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the process and its live descendants."""
        if not self.started:
            return 0.0
        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0.0
        total = 0.0
        for p in tree:
            with contextlib.suppress(psutil.Error):
                times = p.cpu_times()
                total += times.user + times.system
        return total


def tail(path: Path | None, lines: int = 30) -> str:
    """The last lines of a log file, for an error message."""
    return "(no log)" if path is None else log_tail(path, lines, missing="(no log)")


def stop_all(procs: Sequence[ManagedProcess]) -> dict[str, int | None]:
    """Stop in reverse start order (SIGTERM, then SIGKILL after STOP_TIMEOUT_S); every
    one is tried even if another fails. The exit codes (None: never started)."""
    codes: dict[str, int | None] = {}
    for p in reversed(procs):
        try:
            codes[p.name] = p.stop(STOP_TIMEOUT_S).code if p.started else None
        except Exception as exc:
            codes[p.name] = None
            with contextlib.suppress(OSError):
                os.write(2, f"mltasks bench: stopping {p.name} failed: {exc}\n".encode())
    return codes


def wait_until_answering(
    conninfo: str,
    procs: Sequence[ManagedProcess] = (),
    *,
    timeout_s: float = 180.0,
    attempt_s: float = 5.0,
    reject_sources: Sequence[str] = ("bridge",),
    accept_reasons: Sequence[str] = (),
    archetype: str = "aggressive",
) -> float:
    """Send warm-up requests (of ``archetype``) until one is answered by the responder itself.

    An answer from a source in ``reject_sources`` (the bridge's 255 when no worker took
    the batch in time) does not count, unless its reason is in ``accept_reasons`` (the
    bridge's 255 at fallback level 5 is that level's answer): another request is sent.
    Returns the seconds it took; raises BenchError when a process exits or ``timeout_s``
    passes.
    """
    from mltasks.state import sample_states

    state = sample_states(np.random.default_rng(12345), 1)[0].tolist()
    array, hp, sp = state_sql(state)
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    last = "no answer"
    with connect_as_game(conninfo) as conn:
        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            row = conn.execute(
                insert_sql(
                    monster_id=999_000_000 + attempt,
                    mob_id=1002,
                    archetype=archetype,
                    array=array,
                    hp=hp,
                    sp=sp,
                )
            ).fetchone()
            assert row is not None  # INSERT ... RETURNING always returns the row
            request_id = int(row[0])
            attempt_end = min(deadline, time.monotonic() + attempt_s)
            while time.monotonic() < attempt_end:
                for p in procs:
                    p.check()
                answer = conn.execute(
                    bench_query("warm_up_answer"), {"request_id": request_id}
                ).fetchone()
                if answer is not None:
                    if answer[2] not in reject_sources or answer[3] in accept_reasons:
                        return time.monotonic() - t0
                    last = f"answered {answer[0]} by {answer[2]} ({answer[3]})"
                    break
                time.sleep(0.01)
    raise BenchError(f"the responder did not answer a warm-up request in {timeout_s:.0f}s ({last})")
