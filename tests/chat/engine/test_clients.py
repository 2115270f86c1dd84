"""Objects kept per event loop are closed when their loop shuts down (issue 20): no "Unclosed client
session" is left behind by a loop that asyncio.run, uvicorn or asgiref (Django's sync callers) ran."""

import asyncio

from asgiref.sync import async_to_sync

from chat.engine import providers
from chat.engine.clients import per_loop


class Closable:
    def __init__(self) -> None:
        self.closed_on: asyncio.AbstractEventLoop | None = None

    async def close(self) -> None:
        self.closed_on = asyncio.get_running_loop()


def test_an_object_is_built_once_per_loop_and_closed_on_that_loop_when_it_shuts_down():
    kept = per_loop(Closable, close=Closable.close)

    async def use() -> tuple[Closable, asyncio.AbstractEventLoop]:
        assert kept() is kept()
        return kept(), asyncio.get_running_loop()

    first, first_loop = asyncio.run(use())
    second, _ = asyncio.run(use())

    assert first is not second
    assert first.closed_on is first_loop


def test_the_upstream_session_of_a_loop_run_for_a_sync_caller_is_closed_with_it():
    async def session():
        return providers._session()

    used = async_to_sync(session)()

    assert used.closed
