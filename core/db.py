"""Where the request path's database work runs, and the upkeep of its connections.

Each transaction of the API's request path is one hop to a thread of a small pool (`in_db_thread`), each
thread with its own persistent connection: one thread on SQLite, whose writers serialise on the file
anyway; `KITEMESH_DB_THREADS` on PostgreSQL, so one request's round trips overlap another's instead of
queueing behind them (README, Benchmarks). A hop is a plain `run_in_executor` with the caller's context:
asgiref's sync_to_async costs twice as much CPU a hop. The pool is the standard ThreadPoolExecutor: a
hand-written one whose most recently idle thread took the next job (to keep one connection warm at low
load) measured +0.05 ms at c=1 and 0.95× the throughput at c=16 against it (at 67247bd: `make bench BENCH_ARGS=
"--variants fifo_pool"`, 2026-12-07, README Benchmarks), so it went."""

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


@functools.cache
def _pool() -> ThreadPoolExecutor:
    sqlite = connections[DEFAULT_DB_ALIAS].vendor == "sqlite"
    threads = 1 if sqlite else max(settings.KITEMESH_DB_THREADS, 1)
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kitemesh-db")


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
