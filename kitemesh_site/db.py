"""Where the request path's database work runs, and the upkeep of its connections.

Each transaction of the API's request path is one hop to a thread (`in_db_thread`). On SQLite that is
asgiref's one long-lived thread: writers serialise on the file anyway. On PostgreSQL it is a small pool
(`KITEMESH_DB_THREADS`), each thread with its own persistent connection, so one request's round trips
overlap another's instead of queueing behind them (README, Benchmarks)."""

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

T = TypeVar("T")

# Set by the API handler for the requests it serves, which have no caller's transaction to share: their
# work may go to the pool. Anything else (Django's test client, a sync caller) keeps asgiref's
# thread-sensitive routing, which reaches the caller's own connection and its uncommitted rows.
pool_allowed: ContextVar[bool] = ContextVar("kitemesh_db_pool_allowed", default=False)


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
def _pool() -> ThreadPoolExecutor | None:
    """The threads PostgreSQL's work overlaps on; None where the database serialises writers (SQLite)."""
    if connections[DEFAULT_DB_ALIAS].vendor == "sqlite" or settings.KITEMESH_DB_THREADS < 1:
        return None
    return ThreadPoolExecutor(max_workers=settings.KITEMESH_DB_THREADS, thread_name_prefix="kitemesh-db")


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
    pool = _pool() if pool_allowed.get() else None
    if pool is None:
        return await sync_to_async(work)(**kwargs)
    return await sync_to_async(_pooled, thread_sensitive=False, executor=pool)(work, kwargs)
