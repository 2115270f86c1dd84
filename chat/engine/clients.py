"""Pooled HTTP clients kept one per event loop: httpx connections belong to the loop that opened them
(uvicorn runs one loop per worker; tests and management commands may run others)."""

import asyncio
import weakref
from collections.abc import Callable

import httpx


def per_loop_client(factory: Callable[[], httpx.AsyncClient]) -> Callable[[], httpx.AsyncClient]:
    """A getter that builds the client with `factory` once per running event loop."""
    clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()

    def client() -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if loop not in clients:
            clients[loop] = factory()
        return clients[loop]

    return client
