"""The Redis cache layers (mltasks/cache/) on a real Redis, and their behaviour when it dies."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from mltasks import keys
from mltasks.cache.breaker import CircuitBreaker
from mltasks.cache.client import Cache
from mltasks.cache.codec import (
    action_key,
    action_keys,
    format_value,
    logits_key,
    parse_value,
    state_text,
)
from mltasks.cache.stats import hit_rates, read_stats
from mltasks.config import Config
from mltasks.contract import STATE_DIM
from mltasks.game import stof, stoi
from tests.conftest import wait_for
from tests.servers import RedisServer
from tests.skips import need


def game_parses(value: str) -> bool:
    """What the gateway does with a cached value: split at ':', stoi, stof."""
    action, sep, conf = value.partition(":")
    try:
        stoi(action)
        stof(conf)
    except ValueError:
        return False
    return bool(sep)


def vec(*head: float, fill: float = 0.0) -> np.ndarray:
    return np.array([*head] + [fill] * (STATE_DIM - len(head)), dtype=np.float32)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def r(base_config: Config) -> Iterator[redis.Redis]:
    """The test cache db (12), flushed before and after."""
    client = redis.Redis.from_url(base_config.redis.db_url(base_config.redis.cache_db))
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail("Redis is not running at the test URL")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def cache(base_config: Config, r: redis.Redis) -> Iterator[Cache]:
    c = Cache(base_config)
    yield c
    c.close()


# --- the game's key ---------------------------------------------------------------------------


def test_action_key_matches_the_game_vectors() -> None:
    first = vec(0.8, 0.5)
    second = vec(-0.001, 0.005, 0.125, 0.995, 0.333333, fill=1.0)
    assert action_key(first, 1002) == "ml:action:53b7edaf4f8c3ace0aff877fa6e04410"
    assert action_key(second, 1234) == "ml:action:1f7fbcd7312b15b055e239912864cb62"
    assert state_text(first, 1002).startswith("0.80,0.50,0.00,")
    assert state_text(second, 1234).startswith("-0.00,0.00,0.12,1.00,0.33,1.00,")
    # A float64 or list input is the same float32 state.
    assert action_key(first.astype(np.float64).tolist(), 1002) == action_key(first, 1002)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (-0.0, "-0.00"),
        (0.0, "0.00"),
        (-0.001, "-0.00"),
        (-0.004, "-0.00"),
        (-0.006, "-0.01"),
        (0.125, "0.12"),  # exact binary .xx5: half to even
        (0.375, "0.38"),
        (0.625, "0.62"),
        (0.005, "0.00"),  # float32(0.005) is just below
        (0.995, "1.00"),  # float32(0.995) is just above
        (0.335, "0.34"),
        (2.675, "2.67"),
        (1.0, "1.00"),
        (-1.5, "-1.50"),
    ],
)
def test_state_text_prints_like_c(value: float, text: str) -> None:
    assert state_text(vec(value), 7).split(",")[0] == text


def test_state_text_agrees_with_glibc_printf(tmp_path: Path) -> None:
    """The C++ path (float widened to double, %.2f) on thousands of float32 values."""
    gcc = need(shutil.which("gcc") or shutil.which("cc"), "no C compiler")
    src = tmp_path / "fmt.c"
    src.write_text(
        "#include <stdio.h>\n#include <string.h>\n#include <stdint.h>\n"
        "int main(void){unsigned int b; float f;\n"
        ' while(scanf("%x",&b)==1){memcpy(&f,&b,4); printf("%.2f\\n",(double)f);} return 0;}\n'
    )
    exe = tmp_path / "fmt"
    subprocess.run([gcc, "-O0", "-o", str(exe), str(src)], check=True, capture_output=True)
    rng = np.random.default_rng(12)
    edge = np.array(
        [k / 1000 for k in range(-2000, 2001, 5)] + [-0.0, 0.125, 0.005, 0.995, 0.335, -0.001],
        dtype=np.float32,
    )
    values = np.concatenate(
        [edge, rng.uniform(-2, 2, 4000).astype(np.float32), np.array([np.inf, -np.inf], np.float32)]
    )
    values = np.concatenate([values, np.zeros(-len(values) % STATE_DIM, dtype=np.float32)])
    bits = values.view(np.uint32)
    out = subprocess.run(
        [str(exe)], input="\n".join(f"{b:x}" for b in bits), capture_output=True, text=True
    ).stdout.split()
    ours = [
        t
        for chunk in values.reshape(-1, STATE_DIM)
        for t in state_text(chunk, 0).split(":")[0].split(",")
    ]
    assert ours == out


def test_action_key_rejects_a_wrong_shape() -> None:
    with pytest.raises(ValueError):
        action_key(np.zeros(63, dtype=np.float32), 1)


# --- the game's value -------------------------------------------------------------------------


def test_format_value() -> None:
    assert format_value(1, 0.87) == "1:0.870"
    assert format_value(np.int64(9), np.float32(1.0)) == "9:1.000"
    assert format_value(0, -0.0) == "0:0.000"
    assert format_value(2, 0.99996) == "2:1.000"
    for action, conf in [
        (255, 0.5),
        (10, 0.5),
        (-1, 0.5),
        (True, 0.5),
        (1.0, 0.5),
        (1, float("nan")),
        (1, float("inf")),
        (1, -0.1),
        (1, 1.01),
        (1, "x"),
    ]:
        assert format_value(action, conf) is None, (action, conf)  # type: ignore[arg-type]


@given(st.integers(-1000, 1000), st.floats(allow_nan=True, allow_infinity=True))
def test_format_value_is_none_or_parseable_by_the_game(action: int, conf: float) -> None:
    value = format_value(action, conf)
    if value is None:
        return
    assert game_parses(value)
    assert re.fullmatch(r"\d:\d\.\d{3}", value)
    parsed = parse_value(value.encode())
    assert parsed is not None
    assert parsed[0] == action
    assert abs(parsed[1] - conf) <= 0.0005


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"",
        b"abc",
        b"1:",
        b":0.5",
        b"1:0.5:3",
        b"255:0.000",
        b"10:0.5",
        b"1:nan",
        b"1:1.5",
        b"-1:0.5",
        b"\xff\xfe",
        b"99999999999:0.1",
        b"1:0.5e3",
    ],
)
def test_parse_value_refuses_garbage(raw: bytes | None) -> None:
    assert parse_value(raw) is None


def test_parse_value_reads_what_the_game_writes() -> None:
    assert parse_value(b"1:0.870") == (1, 0.87)
    assert parse_value("9:1.000") == (9, 1.0)
    assert parse_value(b"0:0") == (0, 0.0)


# --- L2 on Redis ------------------------------------------------------------------------------


def count_round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts this thread's sends to Redis (a pipeline is one send).

    Other threads of the test process (a level monitor or heartbeat left by an earlier
    test) may talk to Redis meanwhile; they are not the code under test.
    """
    sent = [0]
    me = threading.get_ident()
    # redis-py leaves this method unannotated: typed here by what the test calls it with.
    original: Callable[[Any, Any, bool], None] = (
        redis.connection.AbstractConnection.send_packed_command
    )

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        if threading.get_ident() == me:
            sent[0] += 1
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    return sent


def test_actions_store_and_lookup_in_one_round_trip_each(
    cache: Cache, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    states = [vec(i / 100) for i in range(20)]
    names = [action_key(s, 1002) for s in states]
    cache.client().ping()  # the connection handshake is not part of what we count
    cache.store_actions([(action_key(vec(9.0), 1), 1, 0.5)])  # loads the write script once
    sent = count_round_trips(monkeypatch)

    assert cache.lookup_actions(names) == [None] * 20
    assert sent[0] == 1
    written = cache.store_actions((n, i % 10, 0.5) for i, n in enumerate(names))
    assert written == 20
    assert sent[0] == 2  # one script call for the 20 values, the hit counters: one pipeline
    found = cache.lookup_actions(names)
    assert sent[0] == 3
    assert cache.lookup_actions([]) == []
    assert sent[0] == 3
    assert found == [(i % 10, 0.5) for i in range(20)]
    assert r.get(names[3]) == b"3:0.500"
    assert 0 < r.ttl(names[3]) <= cache.config.caching.action_ttl_s


def test_255_and_bad_answers_are_never_stored(cache: Cache, r: redis.Redis) -> None:
    a, b, c, d = (action_key(vec(x), 1) for x in (0.1, 0.2, 0.3, 0.4))
    written = cache.store_actions([(a, 255, 0.0), (b, 1, float("nan")), (c, 3, 0.25), (d, 12, 0.5)])
    assert written == 1
    assert r.exists(a, b, d) == 0
    assert r.get(c) == b"3:0.250"
    assert cache.lookup_actions([a, c]) == [None, (3, 0.25)]


def test_a_malformed_value_in_redis_is_a_miss(cache: Cache, r: redis.Redis) -> None:
    name = action_key(vec(0.9), 5)
    r.set(name, b"oops", ex=10)
    assert cache.lookup_actions([name]) == [None]


def test_hits_and_misses_per_layer(cache: Cache, r: redis.Redis) -> None:
    names = [action_key(vec(i / 10), 1) for i in range(4)]
    cache.store_actions([(names[0], 1, 0.9)])
    cache.lookup_actions(names)  # 1 hit, 3 misses
    cache.remember_states([(42, vec(0.5))])
    cache.recent_states(42)  # hit
    cache.recent_states(43)  # miss
    states = np.stack([vec(0.1), vec(0.2)])
    cache.store_logits("mage", "combat_dqn", states[:1], np.ones((1, 10), dtype=np.float32))
    cache.lookup_logits("mage", "combat_dqn", states)  # 1 hit, 1 miss

    assert (cache.stats["l2"].hits, cache.stats["l2"].misses) == (1, 3)
    assert (cache.stats["l1"].hits, cache.stats["l1"].misses) == (1, 1)
    assert (cache.stats["l3"].hits, cache.stats["l3"].misses) == (1, 1)
    # Every layer's counters rode on a later write or the explicit flush.
    assert cache.hit_rates() == {"l1": 0.5, "l2": 0.25, "l3": 0.5}
    stats = read_stats(r, scope=cache.scope)
    assert (stats["l2"].hits, stats["l2"].misses) == (1, 3)
    assert hit_rates(r, scope=cache.scope) == {"l1": 0.5, "l2": 0.25, "l3": 0.5}


def test_repeated_states_reach_70_percent_l2_hits(cache: Cache, r: redis.Redis) -> None:
    rng = np.random.default_rng(7)
    states = rng.uniform(0, 1, (500, STATE_DIM)).astype(np.float32)
    names = [action_key(s, 1002) for s in states]
    picks = rng.integers(0, 500, 5000)
    for batch in np.split(picks, 100):
        found = cache.lookup_actions([names[i] for i in batch])
        cache.store_actions(
            (names[i], int(i) % 10, 0.75) for i, f in zip(batch, found, strict=True) if f is None
        )
    assert cache.stats["l2"].lookups == 5000
    assert cache.stats["l2"].rate >= 0.70
    cache.flush_stats()
    assert read_stats(r, scope=cache.scope)["l2"].lookups == 5000


# --- L1 working memory ------------------------------------------------------------------------


def test_working_memory_keeps_the_last_10_with_a_ttl(cache: Cache, r: redis.Redis) -> None:
    assert cache.recent_states(7).shape == (0, STATE_DIM)
    for step in range(15):
        cache.remember_states([(7, vec(step)), (8, vec(100 + step))])
    seven = cache.recent_states(7)
    assert seven.shape == (10, STATE_DIM)
    assert seven.dtype == np.float32
    assert seven[:, 0].tolist() == list(range(5, 15))  # oldest first
    both = cache.recent_states_many([7, 8, 9])
    assert both[1][-1, 0] == 114
    assert both[2].shape == (0, STATE_DIM)
    name = f"{keys.WORKING_MEMORY_PREFIX}7"
    assert r.llen(name) == keys.WORKING_MEMORY_LEN
    assert 0 < r.ttl(name) <= keys.WORKING_MEMORY_TTL_S


# --- L3 model outputs -------------------------------------------------------------------------


def test_logits_round_trip_and_share_quantized_states(cache: Cache) -> None:
    states = np.stack([vec(0.5, 0.25), vec(0.9)])
    logits = np.arange(20, dtype=np.float32).reshape(2, 10) / 3
    assert cache.store_logits("tank", "combat_dqn", states, logits) == 2
    near = np.stack([vec(0.501, 0.2499), vec(0.9)])
    got = cache.lookup_logits("tank", "combat_dqn", near)
    assert got[0] is not None and got[1] is not None
    np.testing.assert_array_equal(got[0], logits[0])
    np.testing.assert_array_equal(got[1], logits[1])
    assert cache.lookup_logits("mage", "combat_dqn", states) == [None, None]
    assert cache.lookup_logits("tank", "skill_dqn", states) == [None, None]
    assert cache.lookup_logits("tank", "combat_dqn", np.stack([vec(0.52, 0.25)])) == [None]


def test_non_finite_states_and_logits_are_not_cached(cache: Cache) -> None:
    states = np.stack([vec(float("nan")), vec(0.3), vec(0.4)])
    logits = np.ones((3, 10), dtype=np.float32)
    logits[2, 4] = np.inf
    assert logits_key("tank", "combat_dqn", states[0]) is None
    assert cache.store_logits("tank", "combat_dqn", states, logits) == 1
    found = cache.lookup_logits("tank", "combat_dqn", states)
    assert [f is not None for f in found] == [False, True, False]
    assert cache.remember_states([(1, states[0])]) == 0


# --- TTLs ------------------------------------------------------------------------------------


def test_every_key_written_has_a_ttl(cache: Cache, r: redis.Redis) -> None:
    states = np.stack([vec(i / 7) for i in range(5)])
    names = [action_key(s, 3) for s in states]
    cache.lookup_actions(names)
    cache.store_actions((n, 2, 0.5) for n in names)
    cache.remember_states((i, s) for i, s in enumerate(states))
    cache.recent_states(1)
    cache.lookup_logits("support", "movement_ppo", states)
    cache.store_logits("support", "movement_ppo", states, np.zeros((5, 10), dtype=np.float32))
    cache.flush_stats()
    found = list(r.scan_iter(count=1000))
    prefixes = {k.decode().rsplit(":", 1)[0] for k in found}
    assert any(p.startswith(keys.STATS_PREFIX) for p in prefixes)
    assert any(k.startswith(keys.GAME_ACTION_PREFIX.encode()) for k in found)
    assert any(k.startswith(keys.WORKING_MEMORY_PREFIX.encode()) for k in found)
    assert any(k.startswith(keys.LOGITS_PREFIX.encode()) for k in found)
    for k in found:
        assert k.startswith((keys.PREFIX.encode(), keys.GAME_ACTION_PREFIX.encode())), k
        assert r.ttl(k) > 0, k


# --- disabled, and the breaker ----------------------------------------------------------------


def test_a_disabled_cache_never_touches_redis(base_config: Config, r: redis.Redis) -> None:
    cfg = dataclasses.replace(
        base_config, caching=dataclasses.replace(base_config.caching, enabled=False)
    )
    c = Cache(cfg)
    name = action_key(vec(0.1), 1)
    r.set(name, "1:0.500", ex=10)
    assert c.lookup_actions([name]) == [None]
    assert c.store_actions([(action_key(vec(0.2), 1), 1, 0.5)]) == 0
    assert c.remember_states([(1, vec(0.1))]) == 0
    assert c.hit_rates() == {}
    assert c._client is None
    # Nothing it was asked to write is there. (Not a dbsize: the session's in-process worker
    # may write into this db meanwhile.) c._client None above: it never even connected.
    assert r.get(name) == b"1:0.500"
    assert not r.exists(action_key(vec(0.2), 1))
    assert not r.exists(f"{keys.WORKING_MEMORY_PREFIX}1")


def events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(getattr(rec, "event", "")) for rec in caplog.records if rec.name == "mltasks.cache"]


def state(breaker: CircuitBreaker) -> str:
    """The breaker's state, read afresh: mypy would keep `breaker.state` narrowed to the
    value last asserted across the calls that change it."""
    return breaker.state


def test_circuit_breaker_states(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    b = CircuitBreaker("cache", retry_interval_s=1.0, clock=clock)
    caplog.set_level(logging.INFO, logger="mltasks.cache")
    assert b.allow() and state(b) == "closed"
    b.success()
    b.failure(ConnectionError("refused"))
    b.failure(ConnectionError("refused again"))  # still down: no second line
    assert state(b) == "open"
    assert not b.allow()
    clock.t += 0.99
    assert not b.allow()
    clock.t += 0.01
    assert b.allow() and state(b) == "half_open"
    assert not b.allow()  # one probe per interval
    b.failure(ConnectionError("still refused"))
    assert state(b) == "open" and not b.allow()
    clock.t += 1.0
    assert b.allow()
    b.success()
    assert state(b) == "closed" and b.allow()
    assert b.probes == 2
    assert events(caplog) == ["cache_down", "cache_up"]


# --- an outage on a private redis-server ------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A throwaway redis-server on its own port; always stopped at teardown."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_outage_turns_the_cache_off_and_it_resumes_by_itself(
    base_config: Config,
    private_redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = dataclasses.replace(
        base_config,
        redis=dataclasses.replace(base_config.redis, url=private_redis.url, socket_timeout_s=0.5),
    )
    clock = FakeClock()
    c = Cache(cfg, clock=clock)
    caplog.set_level(logging.INFO, logger="mltasks.cache")
    name = action_key(vec(0.8, 0.5), 1002)
    try:
        assert c.store_actions([(name, 1, 0.87)]) == 1
        assert c.lookup_actions([name]) == [(1, 0.87)]

        attempts = [0]
        # Unannotated in redis-py: typed here by how the test calls it. Every connection
        # attempt passes here: a pooled one through connect(), the cache's own single
        # connection straight from its send.
        original: Callable[..., None] = redis.connection.AbstractConnection.connect_check_health

        def counting_connect(self: Any, *args: Any, **kwargs: Any) -> None:
            # Only the cache's server (the in-process worker's threads connect elsewhere),
            # and only a real attempt (a connected socket returns at once).
            if getattr(self, "port", None) == private_redis.port and self._sock is None:
                attempts[0] += 1
            original(self, *args, **kwargs)

        monkeypatch.setattr(
            redis.connection.AbstractConnection, "connect_check_health", counting_connect
        )

        private_redis.stop()
        # 200 batches over 10 s of (fake) time: misses, no exception, about 1 attempt a second.
        for _ in range(200):
            assert c.lookup_actions([name]) == [None]
            assert c.store_actions([(name, 2, 0.5)]) == 0
            assert c.remember_states([(1, vec(0.1))]) == 0
            assert c.recent_states(1).shape == (0, STATE_DIM)
            assert c.lookup_logits("tank", "combat_dqn", [vec(0.1)]) == [None]
            clock.t += 0.05
        assert state(c.breaker) in ("open", "half_open")
        # The failing call on the dropped connection, then one probe per (fake) second.
        assert 5 <= attempts[0] <= 12, attempts[0]
        assert events(caplog) == ["cache_down"]

        private_redis.start()  # same port, empty data

        def resumed() -> bool:
            clock.t += 1.0
            return c.store_actions([(name, 3, 0.5)]) == 1

        wait_for(resumed, what="the cache to resume")
        assert state(c.breaker) == "closed"
        assert c.lookup_actions([name]) == [(3, 0.5)]
        assert events(caplog) == ["cache_down", "cache_up"]
        # Counters from the outage were kept and sent once Redis was back.
        c.flush_stats()
        assert read_stats(c.client(), scope=c.scope)["l2"].lookups == c.stats["l2"].lookups
    finally:
        c.close()


def test_batch_keys_by_table_equal_the_formatted_text() -> None:
    """action_keys prints typical values from a table; it must equal C-style %.2f text."""
    rng = np.random.default_rng(1)
    ties = (np.round(rng.uniform(-2, 2, (100, 64)) * 100) + 0.5) / 100  # x.xx5 everywhere
    cases = [
        rng.uniform(-1, 1, (100, 64)),
        rng.uniform(-150, 150, (100, 64)),  # beyond the table: the formatted path
        ties,
        rng.normal(0, 1e-3, (100, 64)),  # -0.00 and 0.00
        np.full((1, 64), -0.0),
        np.full((1, 64), 99.995),
        np.full((1, 64), 100.005),
    ]
    for case in cases:
        states = case.astype(np.float32)
        mobs = list(range(len(states)))
        expected = [
            "ml:action:" + hashlib.md5(state_text(s, m).encode()).hexdigest()
            for s, m in zip(states, mobs, strict=True)
        ]
        assert action_keys(states, mobs) == expected
