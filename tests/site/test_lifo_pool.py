"""core.db.LifoThreadPool, the API's database threads: the most recently idle thread takes the next
job, jobs that find every thread busy wait their turn in order, and nothing is lost at shutdown."""

import threading
import time

import pytest

from core.db import LifoThreadPool

WAIT = 10  # seconds; a correct pool answers at once


def _thread_name() -> str:
    return threading.current_thread().name


def _blocked_until(gate: threading.Event, started: threading.Event | None = None) -> str:
    if started is not None:
        started.set()
    assert gate.wait(WAIT)
    return _thread_name()


def _wait_idle(pool: LifoThreadPool, threads: int) -> None:
    """A thread goes back to the idle stack just after it sets its job's result: wait until `threads` have."""
    deadline = time.monotonic() + WAIT
    while len(pool._idle) != threads:
        assert time.monotonic() < deadline, f"{len(pool._idle)} idle threads, expected {threads}"
        time.sleep(0.001)


@pytest.fixture
def pool():
    pool = LifoThreadPool(max_threads=3, name="test-pool")
    yield pool
    pool.shutdown()


def test_jobs_one_at_a_time_need_one_thread(pool):
    names = set()
    for _ in range(20):
        names.add(pool.submit(_thread_name).result(WAIT))
        _wait_idle(pool, 1)

    assert names == {"test-pool_0"}


def test_the_most_recently_idle_thread_takes_the_next_job(pool):
    gates = [threading.Event() for _ in range(3)]
    started = [threading.Event() for _ in range(3)]
    running = [pool.submit(_blocked_until, gate, up) for gate, up in zip(gates, started, strict=True)]
    assert all(up.wait(WAIT) for up in started)  # three jobs at once: three threads
    names = []
    for idle, (gate, future) in enumerate(zip(gates, running, strict=True), start=1):  # ending one by one
        gate.set()
        names.append(future.result(WAIT))
        _wait_idle(pool, idle)
    assert sorted(names) == ["test-pool_0", "test-pool_1", "test-pool_2"]

    # Each job goes to the thread that ended last, and puts it back on top: threads taking turns would not.
    for _ in range(10):
        assert pool.submit(_thread_name).result(WAIT) == names[-1]
        _wait_idle(pool, 3)


def test_jobs_that_find_every_thread_busy_wait_and_run_in_order(pool):
    gate = threading.Event()
    started = [threading.Event() for _ in range(3)]
    busy = [pool.submit(_blocked_until, gate, up) for up in started]
    assert all(up.wait(WAIT) for up in started)
    order: list[int] = []
    waiting = [pool.submit(order.append, n) for n in range(5)]

    assert not any(future.done() for future in waiting)
    gate.set()
    for future in [*busy, *waiting]:
        future.result(WAIT)
    assert order == [0, 1, 2, 3, 4]
    assert len({future.result() for future in busy}) == 3  # no more threads than max_threads


def test_a_job_that_raises_gives_its_error_to_the_caller_and_the_thread_goes_on(pool):
    def fail() -> None:
        raise ValueError("no such row")

    with pytest.raises(ValueError, match="no such row"):
        pool.submit(fail).result(WAIT)
    assert pool.submit(_thread_name).result(WAIT) == "test-pool_0"


def test_keyword_arguments_reach_the_job(pool):
    assert pool.submit(dict, a=1, b="x").result(WAIT) == {"a": 1, "b": "x"}


def _one_running_one_waiting(name: str):
    """A one-thread pool busy with a job that ends in 0.2 s, and a job waiting for it."""
    pool = LifoThreadPool(max_threads=1, name=name)
    gate, started = threading.Event(), threading.Event()
    running = pool.submit(_blocked_until, gate, started)
    assert started.wait(WAIT)
    waiting = pool.submit(_thread_name)
    threading.Timer(0.2, gate.set).start()
    return pool, running, waiting


def test_shutdown_finishes_running_and_waiting_jobs_then_refuses_new_ones():
    pool, running, waiting = _one_running_one_waiting("test-shutdown")

    pool.shutdown(wait=True)

    assert running.result(0) == "test-shutdown_0"
    assert waiting.result(0) == "test-shutdown_0"
    assert not any(thread.name.startswith("test-shutdown") for thread in threading.enumerate())
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(_thread_name)


def test_shutdown_can_cancel_the_waiting_jobs():
    pool, running, waiting = _one_running_one_waiting("test-cancel")

    pool.shutdown(wait=True, cancel_futures=True)

    assert running.result(0) == "test-cancel_0"
    assert waiting.cancelled()
