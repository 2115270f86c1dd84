"""The ASGI lifespan (kitemesh_site.asgi): start-up checks, then what start-up built is frozen out of the
garbage collector's full collections; shutdown closes what the process holds."""

import asyncio
import gc

from kitemesh_site.asgi import application


def _lifespan(*messages: str) -> list[str]:
    """Run the application's lifespan as uvicorn does; the types of the messages it sends back."""
    incoming = [{"type": f"lifespan.{m}"} for m in messages]
    sent = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message["type"])

    asyncio.run(application({"type": "lifespan"}, receive, send))
    return sent


def test_startup_freezes_what_it_built_out_of_the_garbage_collector():
    gc.unfreeze()
    assert gc.get_freeze_count() == 0

    assert _lifespan("startup", "shutdown") == ["lifespan.startup.complete", "lifespan.shutdown.complete"]

    # Django, DRF and every module imported: far more than a request creates.
    assert gc.get_freeze_count() > 50_000
