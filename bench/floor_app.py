"""The ASGI application bench/floors.py serves: KiteMesh's own, plus endpoints that stop part of the way
through a completion, so each layer's cost can be read off by difference (c=1 latency):

- `/floor/raw`: a bare ASGI answer from uvicorn, before Django;
- `/v1/floor/view`: the API's Django handler and DRF view, the token and group from the worker's cache,
  the body parsed as a completion's is, then a fixed answer (no database, no upstream);
- `/v1/floor/upstream`: the same, then one upstream call through the engine's provider;
- `/v1/chat/completions` and the rest: KiteMesh unchanged.

The floor views are the completion view's subclasses, so they take the same path up to where they stop.
This module is also the URLconf (the floor paths before the project's)."""

from django.conf import settings
from django.http import HttpResponse
from django.urls import path
from rest_framework.request import Request

import kitemesh_site.asgi as site
from chat.api import ChatCompletionCreateApi, _body, _json_response
from chat.engine.providers import provider_for
from chat.selectors import GroupForRun, group_for_run_cached, group_for_run_get, model_endpoint_get
from chat.wire.requests import chat_request_parse
from core.db import in_db_thread
from kitemesh_site.urls import urlpatterns as site_urlpatterns

RAW_BODY = b'{"object": "floor"}'


async def _group_for_run(caller, group_id) -> GroupForRun:
    """As a completion's start reads its group: from the worker's cache, else in a database thread."""
    found = group_for_run_cached(caller=caller, group_id=group_id)
    return (found or await in_db_thread(group_for_run_get, caller=caller, group_id=group_id))[1]


class ViewFloorApi(ChatCompletionCreateApi):
    async def post(self, request: Request) -> HttpResponse:
        chat_request = chat_request_parse(_body(request))
        await _group_for_run(request.caller, chat_request.group_id)
        return _json_response({"object": "floor"})


class UpstreamFloorApi(ChatCompletionCreateApi):
    async def post(self, request: Request) -> HttpResponse:
        chat_request = chat_request_parse(_body(request))
        parts = await _group_for_run(request.caller, chat_request.group_id)
        endpoint = model_endpoint_get(parts.group.brain)
        reply = await provider_for(endpoint).complete(endpoint, chat_request.messages, {"max_tokens": 256})
        return _json_response({"object": "floor", "content": reply.content})


urlpatterns = [
    path("v1/floor/view", ViewFloorApi.as_view()),
    path("v1/floor/upstream", UpstreamFloorApi.as_view()),
    *site_urlpatterns,
]
settings.ROOT_URLCONF = __name__  # read per request by Django's handler: set before the first one


async def application(scope, receive, send) -> None:
    if scope["type"] == "http" and scope["path"] == "/floor/raw":
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": RAW_BODY})
        return
    await site.application(scope, receive, send)
