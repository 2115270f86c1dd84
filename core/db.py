"""Where the request path's database work runs, and the upkeep of its connections.

Each transaction of the API's request path is one hop to a thread of a small pool (`in_db_thread`), each
thread with its own persistent connection: one thread on SQLite, whose writers serialise on the file
anyway; `KITEMESH_DB_THREADS` on PostgreSQL, so one request's round trips overlap another's instead of
queueing behind them (README, Benchmarks). A hop is a plain `run_in_executor` with the caller's context:
asgiref's sync_to_async costs twice as much CPU a hop. The pool hands each job to its most recently idle
thread (LifoThreadPool), so a lightly loaded worker keeps one thread and connection busy and warm."""

import asyncio
import atexit
import contextvars
import functools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any, TypeVar

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

T = TypeVar("T")


def connections_upkeep() -> None:
    """Django's close_old_connections, for a path that sends no request signals (the API handler): drop
    this thread's connections that broke or outlived CONN_MAX_AGE, so the next statement opens a fresh
    one. A connection inside a transaction is left alone (a test's, whose data the request must see)."""
    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()


@functools.cache
def connections_closed_per_request() -> bool:
    """CONN_MAX_AGE=0: a request's connection is closed when it ends, not kept for the next one."""
    return any(connection.settings_dict["CONN_MAX_AGE"] == 0 for connection in connections.all())


@dataclass
class _Job:
    future: Future
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # as ThreadPoolExecutor: the caller gets whatever the job raised
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


class LifoThreadPool(Executor):
    """A thread pool whose most recently idle thread takes the next job. ThreadPoolExecutor's threads take
    turns instead (they wait on one queue, which wakes them in the order they began to wait), and each of
    ours keeps a database connection with, on PostgreSQL, a server process behind it: taking turns, each
    job found a thread and a server process whose caches had gone cold while the others worked. At low
    load one thread now does the work (c=1 p50 0.2–0.4 ms lower on the benchmark's VM, README Benchmarks);
    under load every thread works. Threads start as jobs need them; at exit the running jobs are finished."""

    def __init__(self, max_threads: int, name: str) -> None:
        self._max_threads, self._name = max_threads, name
        self._lock = threading.Lock()
        self._idle: list[SimpleQueue] = []  # the idle threads' inboxes, the most recently idle last
        self._backlog: deque[_Job] = deque()  # jobs that found every thread busy, in order
        self._threads: list[threading.Thread] = []
        self._closed = False
        atexit.register(self.shutdown)  # runs before the interpreter stops daemon threads

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future:
        job = _Job(Future(), fn, args, kwargs)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: cannot take jobs after shutdown")
            if self._idle:
                inbox = self._idle.pop()
            elif len(self._threads) < self._max_threads:
                inbox = self._thread_start()
            else:
                self._backlog.append(job)
                return job.future
        inbox.put(job)
        return job.future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                for job in self._backlog:
                    job.future.cancel()
            idle, self._idle = self._idle, []
            threads = list(self._threads)
        for inbox in idle:
            inbox.put(None)
        if wait:
            for thread in threads:
                thread.join()

    def _thread_start(self) -> SimpleQueue:
        inbox: SimpleQueue = SimpleQueue()
        name = f"{self._name}_{len(self._threads)}"
        # A daemon, since an idle thread waits for ever; shutdown (at exit) lets the running jobs finish.
        thread = threading.Thread(target=self._work, args=(inbox,), name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
        return inbox

    def _work(self, inbox: SimpleQueue) -> None:
        job = inbox.get()
        while job is not None:
            job.run()
            job = None  # what it holds is let go now, not when the next job comes
            with self._lock:
                if self._backlog:
                    job = self._backlog.popleft()
                    continue
                if self._closed:
                    return
                self._idle.append(inbox)
            job = inbox.get()


@functools.cache
def _pool() -> LifoThreadPool:
    sqlite = connections[DEFAULT_DB_ALIAS].vendor == "sqlite"
    threads = 1 if sqlite else max(settings.KITEMESH_DB_THREADS, 1)
    return LifoThreadPool(max_threads=threads, name="kitemesh-db")


def _pooled(work: Callable[..., T], kwargs: dict[str, Any]) -> T:
    # A pool thread is reused by many requests: its connection gets the upkeep a request would give it.
    connections_upkeep()
    try:
        return work(**kwargs)
    finally:
        if connections_closed_per_request():
            connections_upkeep()


async def in_db_thread(work: Callable[..., T], /, **kwargs: Any) -> T:
    """Run `work(**kwargs)` (one transaction, or one read) off the event loop."""
    return await db_future(work, **kwargs)


def db_future(work: Callable[..., T], /, **kwargs: Any) -> asyncio.Future[T]:
    """in_db_thread's work, started: its future, for a caller that shields it from cancellation."""
    context = contextvars.copy_context()  # the request's (its id, for logs)
    return asyncio.get_running_loop().run_in_executor(_pool(), context.run, _pooled, work, kwargs)
