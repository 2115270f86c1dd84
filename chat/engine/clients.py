"""Connection-holding objects kept one per event loop: HTTP and Redis connections belong to the loop
that opened them (uvicorn runs one loop per worker; tests and management commands may run others)."""

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class per_loop(Generic[T]):  # lower case: it is used like a function, `_client = per_loop(make_client)`
    """A getter that builds its object with `factory` once per running event loop."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self.factory = factory
        self.objects: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()

    def __call__(self) -> T:
        loop = asyncio.get_running_loop()
        if loop not in self.objects:
            self.objects[loop] = self.factory()
        return self.objects[loop]

    def pop(self) -> T | None:
        """The running loop's object, forgotten (for its owner to close), or None if it has none."""
        return self.objects.pop(asyncio.get_running_loop(), None)
