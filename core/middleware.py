"""A request id on every API response, and on every log line written while it is served (the body size limit
is kitemesh_site.asgi's, answered before a body is read)."""

from collections.abc import Callable

from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest, HttpResponse
from django.utils.decorators import sync_and_async_middleware

from core.envelope import request_id_new
from core.logs import request_id_var

API_PREFIXES = ("/v1/",)


def request_id_bind(request: HttpRequest, request_id: str) -> None:
    """Make `request_id` the request's: its X-Request-ID, and the id on the log lines written for it. Never
    reset, since a stream logs after the middleware returns: under ASGI each request runs in a context of its
    own (Django's task, copied into any sync_to_async thread), which ends with it."""
    request.kitemesh_request_id = request_id
    request_id_var.set(request_id)


def _tag(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    # The view replaces the generated id with the client's metadata.request_id when there is one.
    response["X-Request-ID"] = request.kitemesh_request_id
    return response


@sync_and_async_middleware
def api_request_middleware(get_response: Callable) -> Callable:
    """Natively async so API requests cross no thread for it (a MiddlewareMixin class would)."""
    if iscoroutinefunction(get_response):

        async def middleware(request: HttpRequest) -> HttpResponse:
            if not request.path.startswith(API_PREFIXES):
                return await get_response(request)
            request_id_bind(request, request_id_new())
            return _tag(request, await get_response(request))

    else:

        def middleware(request: HttpRequest) -> HttpResponse:
            if not request.path.startswith(API_PREFIXES):
                return get_response(request)
            # Served in a thread that serves others too (WSGI): the id must not outlive the request.
            outer = request_id_var.set(None)
            try:
                request_id_bind(request, request_id_new())
                return _tag(request, get_response(request))
            finally:
                request_id_var.reset(outer)

    return middleware
