"""The ASGI application (`kitemesh_site.asgi:application`): Django for HTTP, measured and behind a body-size
guard that answers 413 before a large body is read; lifespan handled here; other scope types refused."""

import asyncio
import contextlib
import gc
import os

from asgiref.sync import sync_to_async
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kitemesh_site.settings.base")
# Static files (the admin's) are served by Django itself under /static/; a reverse proxy may take over.
django_application = ASGIStaticFilesHandler(get_asgi_application())

from django.conf import settings  # noqa: E402  (after Django is set up)
from django.core.exceptions import RequestAborted  # noqa: E402
from django.core.handlers.asgi import ASGIHandler, get_script_prefix  # noqa: E402
from django.core.handlers.exception import convert_exception_to_response  # noqa: E402
from django.urls import set_script_prefix  # noqa: E402

from core import metrics  # noqa: E402
from core.db import connections_closed_per_request, connections_upkeep  # noqa: E402
from core.envelope import error_body, request_id_new  # noqa: E402
from core.errors import RequestTooLarge  # noqa: E402
from core.middleware import API_PREFIXES, api_request_middleware  # noqa: E402
from core.vault import vault_key_check  # noqa: E402


class ApiHandler(ASGIHandler):
    """Django for the API paths, without what only pages use. Its one middleware is natively async (each
    MiddlewareMixin class of the pages would cost two thread hops a request), and it opens no
    ThreadSensitiveContext: the sync work of API requests (DRF's authentication, the engine's
    transactions, one hop each) runs on long-lived threads — asgiref's one, and on PostgreSQL the pool
    of core.db — whose database connections persist across requests instead of being opened by
    a new thread for every request."""

    async def __call__(self, scope, receive, send) -> None:
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send) -> None:
        """Django's handle without the request_started and request_finished signals, whose receivers
        are sync (two thread hops a request): the API's database connection upkeep runs in the threads
        its work goes to (core.db's pool, chat.api.ApiView.sync_dispatch), and after the response
        only when connections are closed per request. API responses hold nothing to close."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        try:
            request, error_response = self.create_request(scope, body_file)
            if request is None:
                await self.send_response(error_response, send)
                return
            response = asyncio.create_task(self._respond(request, send))
            disconnect = asyncio.create_task(self.listen_for_disconnect(receive))
            await asyncio.wait([disconnect, response], return_when=asyncio.FIRST_COMPLETED)
            for task in (disconnect, response):  # the disconnect listener first: a view may handle cancellation
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, RequestAborted):
                    await task
        finally:
            body_file.close()
        if connections_closed_per_request():  # what request_finished would do: close it now, not next time
            await sync_to_async(connections_upkeep)()

    async def _respond(self, request, send) -> None:
        response = await self.run_get_response(request)
        with contextlib.suppress(asyncio.CancelledError):  # the client left while it was sent
            await self.send_response(response, send)

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware, self._template_response_middleware, self._exception_middleware = [], [], []
        view = convert_exception_to_response(self._get_response_async)
        self._middleware_chain = convert_exception_to_response(api_request_middleware(view))


api_application = ApiHandler()


async def _send_too_large(send) -> None:
    import json

    request_id = request_id_new()
    error = RequestTooLarge(f"The body is larger than {settings.KITEMESH_MAX_BODY_BYTES} bytes.")
    body = json.dumps(error_body(error, request_id)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"x-request-id", request_id.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _http(scope, receive, send) -> None:
    # Measured out here, not in a Django middleware, so the guard's 413s count too.
    await metrics.http_measure(_body_limited, scope, receive, send)


async def _body_limited(scope, receive, send) -> None:
    limit = settings.KITEMESH_MAX_BODY_BYTES
    declared = dict(scope.get("headers") or ()).get(b"content-length", b"0")
    if declared.isdigit() and int(declared) > limit:
        await _send_too_large(send)
        return
    received, exceeded, started = 0, False, False

    async def limited_receive():
        nonlocal received, exceeded
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:  # a chunked body with no Content-Length: stop reading it
                exceeded = True
                return {"type": "http.disconnect"}
        return message

    async def tracked_send(message):
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    app = api_application if scope["path"].startswith(API_PREFIXES) else django_application
    await app(scope, limited_receive, tracked_send)
    if exceeded and not started:
        await _send_too_large(send)


def _startup_objects_freeze() -> None:
    """Leave what start-up built (Django, DRF, the modules: a few hundred thousand objects that live as
    long as the process) out of the cyclic garbage collector's full collections, which otherwise scan all
    of it every few hundred requests: tens of milliseconds of p99 latency under load (README, Benchmarks)."""
    gc.collect()
    gc.freeze()


async def _lifespan(scope, receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                vault_key_check()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            _startup_objects_freeze()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            metrics.process_exit()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope, receive, send) -> None:
    if scope["type"] == "http":
        await _http(scope, receive, send)
    elif scope["type"] == "lifespan":
        await _lifespan(scope, receive, send)
    else:
        raise ValueError(f"KiteMesh serves no {scope['type']!r} connections")
