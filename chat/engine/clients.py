"""Connection-holding objects kept one per event loop: httpx and Redis connections belong to the loop
that opened them (uvicorn runs one loop per worker; tests and management commands may run others)."""

import asyncio
import weakref
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def per_loop(factory: Callable[[], T]) -> Callable[[], T]:
    """A getter that builds its object with `factory` once per running event loop."""
    objects: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()

    def get() -> T:
        loop = asyncio.get_running_loop()
        if loop not in objects:
            objects[loop] = factory()
        return objects[loop]

    return get
