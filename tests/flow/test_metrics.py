"""mltasks.metrics: the /metrics endpoint, scraped over HTTP, in both process shapes.

The multi-process case runs in a child interpreter: prometheus-client picks its mode once
per process, and this test process (with its in-process worker and bridges) must stay in
the ordinary one.
"""

from __future__ import annotations

import logging
import os
import selectors
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from mltasks import metrics
from mltasks.ops import exporter
from mltasks.serving.inference import Answer
from tests.conftest import wait_for
from tests.skips import need

REPO = Path(__file__).resolve().parents[2]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


class _Unheard:
    """Stands in for `metrics` in the monitor's module: its setters do nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[metrics.Metrics]:
    """This process's metrics in a registry of their own, served on a free port.

    An in-process worker left by an earlier test keeps its monitor thread beating, and
    each beat sets the fallback level and VRAM gauges: it must not write over the values
    the test sets between its set and its scrape (CI once read level 1 where 3 was set).
    """
    from mltasks.serving import monitor

    monkeypatch.setattr(monitor, "metrics", _Unheard())
    registry = CollectorRegistry()
    m = metrics.Metrics(registry)
    metrics.reset_metrics()
    metrics._metrics = m  # the module's functions record into this registry
    yield m
    metrics._metrics = None


def test_single_process_endpoint_moves(isolated: metrics.Metrics) -> None:
    assert isolated.registry is not None
    server = exporter.start_metrics_server("127.0.0.1", 0, isolated.registry)
    try:
        before = scrape(server.url)
        assert value(before, "ml_requests_total", outcome="model") == 0
        assert value(before, "ml_requests_total", outcome="expired") == 0

        metrics.observe_answers({"model": 3, "invalid": 1}, [0.004, 0.006, 0.012, 0.3])
        metrics.observe_batch(4)
        metrics.observe_inference([0.0004])
        metrics.set_queue_stats(7, 0.042)
        metrics.set_fallback_level(3)
        metrics.set_cache_hit_rates({"l2": 0.25})
        metrics.set_models_loaded(54)
        metrics.set_service_up(True)
        metrics.set_vram_usage(0, 1_000_000)

        after = scrape(server.url)
    finally:
        server.close()
    assert value(after, "ml_requests_total", outcome="model") == 3
    assert value(after, "ml_requests_total", outcome="invalid") == 1
    assert value(after, "ml_request_latency_seconds_count") == 4
    assert value(after, "ml_request_latency_seconds_bucket", le="0.005") == 1
    assert value(after, "ml_request_latency_seconds_bucket", le="0.015") == 3
    assert value(after, "ml_batch_size_count") == 1
    assert value(after, "ml_inference_latency_seconds_count") == 1
    assert value(after, "ml_queue_depth") == 7
    assert value(after, "ml_queue_lag_seconds") == pytest.approx(0.042)
    assert value(after, "ml_fallback_level") == 3
    assert value(after, "ml_cache_hit_rate", layer="l2") == 0.25
    assert value(after, "ml_models_loaded_total") == 54
    assert value(after, "ml_service_up") == 1
    assert value(after, "ml_vram_usage_bytes", device="0") == 1_000_000


def test_metric_names_are_what_is_exposed(isolated: metrics.Metrics) -> None:
    assert isolated.registry is not None
    for key in metrics._GAUGES:  # gauges exist once first set
        isolated.gauge(key)
    families = {f.name for f in isolated.registry.collect()}
    # prometheus-client names a counter's family without _total; it exposes ml_requests_total.
    counters = {
        "ml_requests",
        "ml_fusion_answers",
        "ml_model_swaps",
        "ml_canary_rows",
        "ml_canary_decisions",
    }
    exposed = {f"{n}_total" if n in counters else n for n in families}
    assert exposed == metrics.METRIC_NAMES


def test_refresh_runs_at_each_scrape_and_a_failing_one_is_skipped(
    isolated: metrics.Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    assert isolated.registry is not None
    calls: list[int] = []
    redis_away = [True]

    def depth() -> None:
        calls.append(1)
        metrics.set_queue_stats(len(calls), 0.5)

    def cache_rates() -> None:
        if redis_away[0]:
            raise RuntimeError("redis is away")

    server = exporter.start_metrics_server(
        "127.0.0.1", 0, isolated.registry, refresh=[cache_rates, depth]
    )
    caplog.set_level(logging.INFO, logger="mltasks.metrics")
    try:
        assert value(scrape(server.url), "ml_queue_depth") == 1
        assert value(scrape(server.url), "ml_queue_depth") == 2
        redis_away[0] = False
        assert value(scrape(server.url), "ml_queue_depth") == 3
    finally:
        server.close()
    events = [(r.levelname, getattr(r, "event", "")) for r in caplog.records]
    # One warning when it starts failing, not one per scrape; one line when it recovers.
    assert events.count(("WARNING", "metrics_refresh_failed")) == 1
    assert ("INFO", "metrics_refresh_recovered") in events


def test_outcomes_of_answers() -> None:
    answers = [
        Answer(1, 3, 0.9, "model", "completed", "tank/combat_dqn"),
        Answer(2, 3, 0.9, "cache", "completed"),
        Answer(3, 1, 0.7, "rules", "completed", "tank/rules"),
        Answer(4, 255, 0.0, "bridge", "completed", None, "no_model"),
        Answer(5, 255, 0.0, "bridge", "invalid", None, "state_length_3"),
        Answer(6, 255, 0.0, "bridge", "expired", None, "deadline"),
        Answer(7, 2, 0.8, "model", "completed", "tank/combat_dqn"),
    ]
    assert metrics.count_outcomes(answers) == {
        "model": 2,
        "cache": 1,
        "rules": 1,
        "traditional": 1,
        "invalid": 1,
        "expired": 1,
    }
    assert metrics.seconds_since([100.0, None, 100.5, 101.0], now=100.75) == [0.75, 0.25, 0.0]


def test_unknown_outcome_is_refused(isolated: metrics.Metrics) -> None:
    with pytest.raises(ValueError, match="unknown outcome"):
        metrics.observe_answers({"modle": 1}, [])


def test_queue_stats_from_the_table(isolated: metrics.Metrics, pg: Any, config: Any) -> None:
    from mltasks.sql import _queries

    assert "queue_stats" in _queries(), "sql/queries.sql has no queue_stats statement"
    refresher = exporter.QueueStatsRefresher(config.database.conninfo)
    try:
        assert refresher.read() == (0, 0.0)
        pg.execute(
            "INSERT INTO ai_requests (monster_id, mob_id, archetype, state_vector, map_id,"
            " position_x, position_y, hp_ratio, sp_ratio, status, priority, created_at)"
            " VALUES (1, 1002, 'tank', array_fill(0.5::real, ARRAY[64]), 0, 0, 0, 1, 1,"
            " 'pending', 5, clock_timestamp() - interval '3 seconds')"
        )
        refresher()
        depth, lag = refresher.read()
        assert depth == 1
        assert 3.0 <= lag < 30.0
        assert isolated.queue_depth._value.get() == 1
    finally:
        refresher.close()


# --- multi-process mode, in a child interpreter ----------------------------------------------

# Run as `python -c SCRIPT`. prometheus_client is imported first on purpose: multi-process
# mode must still take hold. Protocol on stdin/stdout, one line each.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import prometheus_client  # imported early, as some other module might
    from mltasks import metrics
    from mltasks.ops import exporter

    path = exporter.setup_multiprocess()
    r, w = os.pipe()

    # A pool child that stays alive until killed outright (no shutdown hook runs).
    alive = os.fork()
    if alive == 0:
        metrics.observe_answers({"model": 3}, [0.004, 0.004, 0.004])
        metrics.observe_batch(3)
        metrics.set_models_loaded(54)
        metrics.set_service_up(True)
        os.write(w, b"x")
        signal.pause()
        os._exit(0)

    # A pool child that exits through the worker_process_shutdown hook.
    hooked = os.fork()
    if hooked == 0:
        metrics.observe_answers({"rules": 1}, [0.05])
        metrics.set_models_loaded(50)
        exporter.mark_process_dead(os.getpid())
        os._exit(0)

    os.read(r, 1)
    os.waitpid(hooked, 0)
    metrics.observe_answers({"expired": 2}, [0.2, 0.2])  # the main process records too
    server = exporter.start_metrics_server("127.0.0.1", 0)
    print(path, server.port, alive, hooked, flush=True)
    for line in sys.stdin:
        if line.strip() == "kill":
            os.kill(alive, signal.SIGKILL)
            os.waitpid(alive, 0)
            print("killed", flush=True)
    server.close()
    """
)


def _readline(proc: subprocess.Popen[str], timeout: float = 15.0) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        raise AssertionError(f"no answer from the metrics process in {timeout}s")
    return proc.stdout.readline()


@pytest.fixture
def multiprocess_child(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, _readline(proc).split()
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_multiprocess_children_aggregate_and_dead_gauges_go(
    multiprocess_child: tuple[subprocess.Popen[str], list[str]], tmp_path: Path
) -> None:
    proc, (path, port, alive, hooked) = multiprocess_child
    directory = Path(path)
    # A temporary directory of its own, as the variable was unset.
    assert directory.parent == tmp_path
    assert directory.name.startswith("mltasks-worker-metrics-")
    url = f"http://127.0.0.1:{port}/metrics"

    first = scrape(url)
    # Counters and histograms add up over the three processes.
    assert value(first, "ml_requests_total", outcome="model") == 3
    assert value(first, "ml_requests_total", outcome="rules") == 1
    assert value(first, "ml_requests_total", outcome="expired") == 2
    assert value(first, "ml_request_latency_seconds_count") == 6
    assert value(first, "ml_batch_size_count") == 1
    # The hooked child removed its live gauges when it exited: only the live child counts.
    assert not list(directory.glob(f"gauge_live*_{hooked}.db"))
    assert value(first, "ml_models_loaded_total") == 54
    assert value(first, "ml_service_up") == 1

    assert proc.stdin is not None
    proc.stdin.write("kill\n")
    proc.stdin.flush()
    assert _readline(proc).strip() == "killed"
    assert list(directory.glob(f"gauge_live*_{alive}.db")), "files stay until a scrape"

    second = scrape(url)
    # The killed child's gauges are gone (reaped at the scrape), its counts are not.
    assert not list(directory.glob(f"gauge_live*_{alive}.db"))
    assert value(second, "ml_models_loaded_total") is None
    assert value(second, "ml_service_up") is None
    assert value(second, "ml_requests_total", outcome="model") == 3


def test_setup_multiprocess_cleans_a_given_directory(tmp_path: Path) -> None:
    given = tmp_path / "prom"
    given.mkdir()
    (given / "counter_999999.db").write_bytes(b"stale")
    (given / "keep.txt").write_text("not ours to delete")
    env = dict(os.environ, **{metrics.MULTIPROC_ENV: str(given)})
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mltasks.ops import exporter; from prometheus_client import values;"
            " print(exporter.setup_multiprocess(), values.ValueClass.__name__)",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    path, value_class = out.stdout.split()
    assert Path(path) == given
    assert value_class == "MmapedValue"  # the multi-process value class
    assert not (given / "counter_999999.db").exists()
    assert (given / "keep.txt").exists()


def test_a_zombie_counts_as_dead() -> None:
    """A killed pool child stays a zombie until Celery reaps it: its gauges must go anyway."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        stat = Path(f"/proc/{proc.pid}/stat")
        need(stat.exists(), "no procfs")
        wait_for(lambda: stat.read_text().rpartition(")")[2].split()[0] == "Z", 10, "a zombie")
        assert not exporter._alive(proc.pid)
        assert exporter._alive(os.getpid())
    finally:
        proc.wait()
    assert not exporter._alive(proc.pid)


def test_observe_many_counts_what_observe_counts_one_by_one() -> None:
    # Values on, between, below and above the bounds, repeated: every bucket and the sum
    # must come out as observe() gives them one at a time.
    values = [0.0, 0.001, 0.0011, 0.002, 0.002, 0.03, 0.04999, 2.5, 2.6, 99.0, 0.001]
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    a, b = metrics.Metrics(one_by_one), metrics.Metrics(batched)
    for v in values:
        a.request_latency.observe(v)
    metrics.observe_many(b.request_latency, values)
    metrics.observe_many(b.request_latency, [])

    def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels.get("le", "")): s.value
            for family in registry.collect()
            if family.name == "ml_request_latency_seconds"
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(batched) == pytest.approx(samples(one_by_one))
    assert samples(batched)[("ml_request_latency_seconds_count", "")] == len(values)
