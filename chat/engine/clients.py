"""Connection-holding objects kept one per event loop: HTTP and Redis connections belong to the loop
that opened them (uvicorn runs one loop per worker; tests and management commands may run others)."""

import asyncio
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class per_loop(Generic[T]):  # lower case: it is used like a function, `_client = per_loop(make_client)`
    """A getter that builds its object with `factory` once per running event loop and, given `close`,
    closes it when that loop shuts down."""

    def __init__(self, factory: Callable[[], T], close: Callable[[T], Awaitable[object]] | None = None) -> None:
        self.factory, self.close = factory, close
        # loop → (its object, the parked generator that closes it)
        self.objects: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[T, object]] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(self) -> T:
        loop = asyncio.get_running_loop()
        if loop not in self.objects:
            made = self.factory()
            self.objects[loop] = (made, self._closed_at_shutdown(made) if self.close else None)
        return self.objects[loop][0]

    def _closed_at_shutdown(self, made: T) -> AsyncIterator[None]:
        """An async generator parked on the loop, whose `finally` closes `made`: whoever runs a loop
        (asyncio.run and its Runner, which uvicorn uses; asgiref for Django's sync callers) finishes the
        loop's async generators before closing it, so the object is closed on its own loop, in time."""

        async def parked() -> AsyncIterator[None]:
            try:
                yield
            finally:
                await self.close(made)

        keeper = parked()
        asyncio.get_running_loop().create_task(anext(keeper))  # started: the loop now knows it
        return keeper
