"""The game, emulated: map servers running the C++ gateway's statements, one decision in
flight per client.

Dev's ``--load``, the benchmarks and the tests drive the service with it, so it lives
beside the product rather than inside the benchmark.

Each client is what one map server thread does (shared/CONTRACT.md section 1): INSERT a
request with the values formatted into the SQL text, poll for the answer every 2 ms until
the timeout, mark the row 'timeout' when it gives up, and go on with the next decision at
once. Answers are read as text and parsed the way ``std::stoi``/``std::stof`` would, so a
value that would crash the map server is counted, never hidden by the driver.

The Python client costs CPU the C++ one does not: clients run as threads in at most a few
processes (spawned, so no connection or session crosses a fork), the states and their SQL
text are formatted before the clock starts, and polls are prepared statements on a reused
cursor.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg.types.numeric import Int4
from psycopg.types.string import TextLoader

from mltasks.contract import ARCHETYPES, TRADITIONAL_AI
from mltasks.errors import MLTasksError

# What one decision ended as.
ANSWERED = 0  # an answer was seen before the timeout
TIMEOUT = 1  # the client gave up and marked the row
PARSE_FAILURE = 2  # the answer would have thrown in std::stoi / std::stof: a map server crash

DEFAULT_POLL_MS = 2.0  # the C++ gateway's poll interval
MAX_ERROR_MESSAGES = 20
# Setting up a process (imports, state pool, connections) must not take longer than this.
SETUP_TIMEOUT_S = 120.0


class GatewayError(MLTasksError):
    """A client process failed to set up or to report."""


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    """One load run: how many clients, how long, and how they behave."""

    conninfo: str = field(repr=False)
    clients: int
    duration_s: float
    timeout_ms: int = 100
    poll_ms: float = DEFAULT_POLL_MS
    # Client processes (threads inside each); 0 runs every client as a thread here.
    processes: int = 2
    seed: int = 0
    pool_size: int = 4096
    # True: polls and give-ups as unprepared text with the id formatted in, like libpq's
    # PQexec in the C++; False: prepared, so the Python client costs less.
    literal_sql: bool = False
    layout: str = "encoder"
    # The archetypes the decisions cycle through (one: every batch is that archetype's).
    archetypes: tuple[str, ...] = ARCHETYPES

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError("clients must be at least 1")
        if not self.archetypes or set(self.archetypes) - set(ARCHETYPES):
            raise ValueError(f"archetypes must be among {ARCHETYPES}, got {self.archetypes}")
        if self.duration_s <= 0 or self.timeout_ms <= 0 or self.poll_ms <= 0:
            raise ValueError("duration, timeout and poll interval must be positive")


@dataclass(slots=True)
class GatewayResult:
    """Every decision of a run: latency (ms), outcome and action, in the same order."""

    clients: int
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    outcomes: list[int] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)  # -1 where no answer was parsed
    invalid_answers: int = 0  # parsed, but outside the contract's actions or [0, 1]
    error_count: int = 0
    errors: list[str] = field(default_factory=list)
    client_cpu_s: float = 0.0

    def merge(self, other: GatewayResult) -> None:
        """Add another process's or thread's decisions (same run, same clock)."""
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)
        self.latencies_ms.extend(other.latencies_ms)
        self.outcomes.extend(other.outcomes)
        self.actions.extend(other.actions)
        self.invalid_answers += other.invalid_answers
        self.error_count += other.error_count
        room = MAX_ERROR_MESSAGES - len(self.errors)
        self.errors.extend(other.errors[: max(0, room)])
        self.client_cpu_s += other.client_cpu_s

    def add_error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERROR_MESSAGES:
            self.errors.append(message)


# -- the game's SQL text ----------------------------------------------------------------


def state_sql(state: Sequence[float] | None) -> tuple[str, str, str]:
    """The state as the C++ prints it: ``ARRAY[...]::REAL[]`` with 6 decimals, and HP/SP.

    HP and SP go through iostream's default format (``%g``), the state through ``%.6f``. A
    missing state is ``NULL`` (a broken encoder: the tests send one), its HP and SP 0.
    """
    if state is None:
        return "NULL", "0", "0"
    array = "ARRAY[" + ",".join(f"{v:.6f}" for v in state) + "]::REAL[]"
    hp = state[0] if len(state) > 0 else 0.0
    sp = state[1] if len(state) > 1 else 0.0
    return array, f"{hp:g}", f"{sp:g}"


def insert_sql(
    *,
    monster_id: int,
    mob_id: int,
    archetype: str,
    array: str,
    hp: str,
    sp: str,
    priority: int = 5,
) -> bytes:
    """The gateway's INSERT with every value formatted in (CONTRACT.md section 1)."""
    return (
        "INSERT INTO ai_requests (monster_id, mob_id, archetype, state_vector, "
        "map_id, position_x, position_y, hp_ratio, sp_ratio, status, priority) "
        f"VALUES ({monster_id}, {mob_id}, '{archetype}', {array}, "
        f"0, 0, 0, {hp}, {sp}, 'pending', {int(priority)}) RETURNING request_id"
    ).encode()


# The game's poll and give-up (CONTRACT.md section 1), spelled once: the C++ formats the id
# in (``literal_sql``); bound instead, they can be prepared, so the Python client costs less.
_POLL = "SELECT action_id, confidence FROM ai_responses WHERE request_id = {} LIMIT 1"
_GIVE_UP = "UPDATE ai_requests SET status = 'timeout' WHERE request_id = {}"
POLL_PREPARED = _POLL.format("%(request_id)s")
GIVE_UP_PREPARED = _GIVE_UP.format("%(request_id)s")


def poll_sql(request_id: int) -> bytes:
    """The poll as the C++ formats it, the id in the text."""
    return _POLL.format(int(request_id)).encode()


def give_up_sql(request_id: int) -> bytes:
    """The give-up (the row marked ``timeout``) as the C++ formats it."""
    return _GIVE_UP.format(int(request_id)).encode()


# -- std::stoi / std::stof --------------------------------------------------------------

_STOI = re.compile(r"\s*[+-]?\d+")
_STOF = re.compile(
    r"\s*[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)", re.IGNORECASE
)
_FLT_MAX = 3.4028234663852886e38
_FLT_MIN = 1.1754943508222875e-38  # below it (but not 0) strtof sets ERANGE too


def stoi(text: str | None) -> int:
    """``std::stoi`` on a libpq value: a NULL reads as ""; no leading number throws."""
    m = _STOI.match(text or "")
    if m is None:
        raise ValueError(f"std::stoi: invalid_argument {text!r}")
    value = int(m.group())
    if not -(2**31) <= value < 2**31:
        raise ValueError(f"std::stoi: out_of_range {text!r}")
    return value


def stof(text: str | None) -> float:
    """``std::stof`` on a libpq value: prefix parse; no number, overflow or underflow throws."""
    m = _STOF.match(text or "")
    if m is None:
        raise ValueError(f"std::stof: invalid_argument {text!r}")
    value = float(m.group())
    if abs(value) > _FLT_MAX and "inf" not in m.group().lower():
        raise ValueError(f"std::stof: out_of_range {text!r}")
    if value != 0.0 and abs(value) < _FLT_MIN:
        raise ValueError(f"std::stof: out_of_range {text!r}")
    return value


def in_contract(action_id: int, confidence: float) -> bool:
    """An answer the game can use as it is (CONTRACT.md section 3)."""
    return (0 <= action_id <= 9 or action_id == TRADITIONAL_AI) and 0.0 <= confidence <= 1.0


# -- one client -------------------------------------------------------------------------


def connect_as_game(conninfo: str) -> psycopg.Connection[tuple[Any, ...]]:
    """An autocommit connection that returns numbers as the text libpq would hand the C++."""
    conn = psycopg.connect(conninfo, autocommit=True)
    for oid_name in ("int2", "int4", "int8", "float4", "float8", "numeric"):
        conn.adapters.register_loader(oid_name, TextLoader)
    return conn


class _StatePool:
    """States and their SQL text, formatted before the clock starts."""

    def __init__(self, states: np.ndarray) -> None:
        self.sql = [state_sql(row) for row in states.tolist()]

    def __len__(self) -> int:
        return len(self.sql)


def _client(
    spec: GatewaySpec,
    conn: psycopg.Connection[tuple[Any, ...]],
    client_idx: int,
    pool: _StatePool,
    end_at: float,
    out: GatewayResult,
) -> None:
    """Decisions back to back until ``end_at``; the last one started is finished.

    Owns ``conn`` (and whatever replaces it after an error) and closes it. A bug here is
    recorded as an error: it must show in the report, not vanish with the thread.
    """
    try:
        cur = conn.cursor()
        k = 0
        while time.monotonic() < end_at:
            array, hp, sp = pool.sql[(client_idx * 7919 + k) % len(pool)]
            sql = insert_sql(
                monster_id=110_000_000 + client_idx * 100_000 + k % 100_000,
                mob_id=1002 + (client_idx * 31 + k) % 97,
                archetype=spec.archetypes[(client_idx + k) % len(spec.archetypes)],
                array=array,
                hp=hp,
                sp=sp,
            )
            k += 1
            try:
                _decision(spec, cur, sql, out, client_idx)
            except psycopg.Error as exc:
                out.add_error(f"client {client_idx}: {type(exc).__name__}: {exc}")
                conn.close()
                new_conn = _reconnect(spec.conninfo, end_at)
                if new_conn is None:
                    return
                conn, cur = new_conn, new_conn.cursor()
    except Exception:
        out.add_error(f"client {client_idx} died: {traceback.format_exc(limit=5)}")
    finally:
        conn.close()


def _decision(
    spec: GatewaySpec,
    cur: psycopg.Cursor[tuple[Any, ...]],
    sql: bytes,
    out: GatewayResult,
    client_idx: int,
) -> None:
    """One decision as the map server makes it: insert, poll until the timeout, give up."""
    monotonic = time.monotonic
    poll_s = spec.poll_ms / 1000.0
    t0 = monotonic()
    deadline = t0 + spec.timeout_ms / 1000.0
    cur.execute(sql, prepare=False)
    inserted = cur.fetchone()
    if inserted is None:
        raise psycopg.ProgrammingError("INSERT ... RETURNING returned no row")
    request_id = stoi(inserted[0])  # the C++ reads it with std::stoul
    by_id = {"request_id": Int4(request_id)}
    answer = None
    while monotonic() < deadline:
        if spec.literal_sql:
            cur.execute(poll_sql(request_id), prepare=False)
        else:
            cur.execute(POLL_PREPARED, by_id, prepare=True)
        answer = cur.fetchone()
        if answer is not None:
            break
        time.sleep(max(0.0, min(poll_s, deadline - monotonic())))
    latency_ms = (monotonic() - t0) * 1000.0
    if answer is None:
        # Recorded even when marking the row fails (the error reaches the caller): latencies
        # and outcomes stay the same length.
        try:
            if spec.literal_sql:
                cur.execute(give_up_sql(request_id), prepare=False)
            else:
                cur.execute(GIVE_UP_PREPARED, by_id, prepare=True)
        finally:
            out.latencies_ms.append(latency_ms)
            out.outcomes.append(TIMEOUT)
            out.actions.append(-1)
        return
    out.latencies_ms.append(latency_ms)
    try:
        action_id, confidence = stoi(answer[0]), stof(answer[1])
    except ValueError as exc:
        out.outcomes.append(PARSE_FAILURE)
        out.actions.append(-1)
        out.add_error(f"client {client_idx}: the map server would crash: {exc}")
        return
    out.outcomes.append(ANSWERED)
    out.actions.append(action_id)
    if not in_contract(action_id, confidence):
        out.invalid_answers += 1


def _reconnect(conninfo: str, end_at: float) -> psycopg.Connection[tuple[Any, ...]] | None:
    """A new connection after an error, retried until the run ends (then None)."""
    while time.monotonic() < end_at:
        try:
            return connect_as_game(conninfo)
        except psycopg.OperationalError:
            time.sleep(0.05)
    return None


# -- one process ------------------------------------------------------------------------


def _run_clients(
    spec: GatewaySpec,
    client_ids: Sequence[int],
    proc_idx: int,
    on_ready: Callable[[], None],
    wait_start: Callable[[], bool],
) -> GatewayResult:
    """Run ``client_ids`` as threads of this process, after everyone is set up.

    ``wait_start`` returns False when the start never came (the parent gave up).
    """
    from mltasks.state import sample_states

    rng = np.random.default_rng([spec.seed, proc_idx])
    pool = _StatePool(sample_states(rng, spec.pool_size, spec.layout))
    conns: list[psycopg.Connection[tuple[Any, ...]]] = []
    try:
        for _ in client_ids:
            conns.append(connect_as_game(spec.conninfo))
    except BaseException:
        for c in conns:
            c.close()
        raise
    on_ready()
    if not wait_start():
        for c in conns:
            c.close()
        raise GatewayError("no start signal from the parent")
    cpu0, t0 = time.process_time(), time.monotonic()
    end_at = t0 + spec.duration_s
    parts = [GatewayResult(clients=1) for _ in client_ids]
    threads = [
        threading.Thread(
            target=_client,
            args=(spec, conn, idx, pool, end_at, part),
            name=f"gateway-client-{idx}",
            daemon=True,
        )
        for conn, idx, part in zip(conns, client_ids, parts, strict=True)
    ]
    for t in threads:
        t.start()
    # Every client stops starting decisions at end_at; one in flight ends by its timeout.
    join_by = end_at + spec.timeout_ms / 1000.0 + 30.0
    for t in threads:
        t.join(max(0.0, join_by - time.monotonic()))
    result = GatewayResult(clients=len(client_ids))
    for t, part in zip(threads, parts, strict=True):
        if t.is_alive():
            result.add_error(f"{t.name} did not finish in time")
        else:
            result.merge(part)
    result.elapsed_s = time.monotonic() - t0
    result.client_cpu_s = time.process_time() - cpu0
    return result


def _process_entry(
    spec: GatewaySpec,
    client_ids: list[int],
    proc_idx: int,
    messages: Any,
    start: Any,
) -> None:
    """A client process: report ready, wait for the start, send back the result."""
    # Ctrl-C belongs to the parent, which ends the run; the clients stop by time.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = _run_clients(
            spec,
            client_ids,
            proc_idx,
            on_ready=lambda: messages.put(("ready", proc_idx, None)),
            wait_start=lambda: start.wait(SETUP_TIMEOUT_S),
        )
    except BaseException:
        messages.put(("failed", proc_idx, traceback.format_exc()))
        return
    messages.put(("result", proc_idx, result))


def run_gateway(spec: GatewaySpec) -> GatewayResult:
    """Run the emulated map servers for ``spec.duration_s``; returns every decision."""
    if spec.processes <= 0:
        return _run_clients(spec, range(spec.clients), 0, lambda: None, lambda: True)
    n_proc = min(spec.processes, spec.clients)
    groups = [list(range(i, spec.clients, n_proc)) for i in range(n_proc)]
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    start = ctx.Event()
    procs = [
        ctx.Process(
            target=_process_entry,
            args=(spec, ids, i, messages, start),
            name=f"gateway-{i}",
            daemon=True,
        )
        for i, ids in enumerate(groups)
    ]
    try:
        for p in procs:
            p.start()
        _collect(messages, procs, "ready", time.monotonic() + SETUP_TIMEOUT_S)
        start.set()
        finish_by = time.monotonic() + spec.duration_s + spec.timeout_ms / 1000.0 + 60.0
        result = GatewayResult(clients=spec.clients)
        for part in _collect(messages, procs, "result", finish_by):
            result.merge(part)
        return result
    finally:
        for p in procs:
            if p.pid is None:  # never started
                continue
            p.join(5.0)
            if p.is_alive():
                p.terminate()
                p.join(5.0)
        messages.close()
        messages.join_thread()


def _collect(messages: Any, procs: list[Any], kind: str, until: float) -> list[Any]:
    """One ``kind`` message from every process, or GatewayError naming what went wrong."""
    got: dict[int, Any] = {}
    while len(got) < len(procs):
        remaining = until - time.monotonic()
        if remaining <= 0:
            raise GatewayError(f"client processes did not report {kind!r} in time")
        try:
            msg_kind, idx, payload = messages.get(timeout=min(remaining, 0.5))
        except queue.Empty:
            dead = [p.name for p in procs if not p.is_alive() and p.exitcode not in (None, 0)]
            if dead:
                raise GatewayError(f"client processes died: {', '.join(dead)}") from None
            continue
        if msg_kind == "failed":
            raise GatewayError(f"client process {idx} failed:\n{payload}")
        if msg_kind == kind:
            got[idx] = payload
    return [got[i] for i in sorted(got)]
