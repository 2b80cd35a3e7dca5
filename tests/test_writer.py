"""mltasks.serving.writer: the worker's answer writes on one thread, in order, bounded."""

from __future__ import annotations

import os
import threading
import time

import pytest

from mltasks.serving.writer import Writer


def test_jobs_run_in_the_order_submitted_on_one_other_thread() -> None:
    w = Writer(depth=2)
    seen: list[tuple[int, int]] = []
    for i in range(50):
        w.submit(lambda i=i: seen.append((i, threading.get_ident())))
    assert w.drain(5)
    assert [i for i, _ in seen] == list(range(50))
    threads = {t for _, t in seen}
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert w.close(5)


def test_submit_blocks_while_the_backlog_is_full() -> None:
    w = Writer(depth=1)
    release = threading.Event()
    started = threading.Event()

    def slow() -> None:
        started.set()
        release.wait(5)

    w.submit(slow)  # running
    assert started.wait(5)
    w.submit(lambda: None)  # waiting: the backlog is full now
    third_in = threading.Event()

    def third() -> None:
        w.submit(lambda: None)
        third_in.set()

    t = threading.Thread(target=third)
    t.start()
    assert not third_in.wait(0.3)  # held back: answers never pile up in memory
    release.set()
    assert third_in.wait(5)
    t.join(5)
    assert w.close(5)


def test_a_failing_job_leaves_the_thread_running(caplog: pytest.LogCaptureFixture) -> None:
    w = Writer()
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    w.submit(broken)
    w.submit(lambda: ran.append("after"))
    assert w.drain(5)
    assert ran == ["after"]
    assert any(getattr(r, "event", None) == "answer_write_crashed" for r in caplog.records)
    w.close(5)


def test_close_writes_what_is_pending_then_refuses_more() -> None:
    w = Writer(depth=3)
    done: list[int] = []
    for i in range(3):
        w.submit(lambda i=i: (time.sleep(0.05), done.append(i)))
    assert w.close(5)
    assert done == [0, 1, 2]
    with pytest.raises(RuntimeError):
        w.submit(lambda: None)


def test_drain_says_when_it_ran_out_of_time() -> None:
    w = Writer()
    release = threading.Event()
    w.submit(lambda: release.wait(5))
    assert not w.drain(0.1)
    release.set()
    assert w.drain(5)
    w.close(5)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_gets_a_thread_of_its_own() -> None:
    w = Writer()
    w.submit(lambda: None)
    assert w.drain(5)
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's thread did not come along
        ok = False
        try:
            box: list[int] = []
            w.submit(lambda: box.append(os.getpid()))
            ok = w.drain(5) and box == [os.getpid()]
        finally:
            os.write(wfd, b"1" if ok else b"0")
            os._exit(0)
    os.close(wfd)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    os.close(r)
    w.close(5)
