"""The OpenAI-compatible API. Views only speak HTTP: parse, call the engine or a selector, answer."""

import dataclasses
import functools
import inspect
import uuid
from collections.abc import AsyncIterator

from adrf.views import APIView
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from approvals.bodies import approval_body
from approvals.recovery import approval_recovered_get, execution_recover_if_lapsed
from approvals.selectors import approval_with_calls_get
from approvals.services import approval_expire
from billing.selectors import credit_account_get
from billing.token_limits import token_spend
from chat.authentication import bearer_secret
from chat.engine.render import replay_stream, run_complete, run_stream
from chat.engine.run import Run
from chat.engine.start import Replay, run_resume, run_start
from chat.metrics import stream_first_byte_observe, stream_open
from chat.openapi import (
    approval_detail_schema,
    chat_completion_schema,
    chat_resume_schema,
    credit_balance_schema,
    execution_detail_schema,
    model_list_schema,
)
from chat.selectors import execution_for_token_get, group_list_for_caller
from chat.services.rate_limits import Admitted, stream_release
from chat.services.tokens import token_authenticate, token_error_first, token_recent
from chat.wire.body import body_parse, client_request_id
from chat.wire.requests import ChatRequest, chat_request_parse, resume_request_parse
from chat.wire.responses import execution_body, token_credits_body
from core.db import connections_upkeep, in_db_thread
from core.envelope import error_response
from core.errors import NotFound
from core.middleware import request_id_bind


async def _sse_response(stream: AsyncIterator[bytes], slots: list[str]) -> StreamingHttpResponse:
    """Wait for the first event before answering, so an error that comes first (upstream down) is a
    plain HTTP error, not a stream that fails. From here the stream owns its rate-limit slots."""
    first = await anext(stream)

    async def events() -> AsyncIterator[bytes]:
        with stream_open():
            try:
                stream_first_byte_observe()
                yield first
                async for event in stream:
                    yield event
            finally:
                await stream.aclose()  # a disconnect closes this wrapper: settle the run now, not at GC
                await stream_release(slots)

    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


def _body(request: Request) -> dict:
    """The JSON body; the client's metadata.request_id becomes the request's id before validation."""
    body = body_parse(request.body)
    if client_id := client_request_id(body):
        request_id_bind(request._request, client_id)
    return body


def _json_response(body: dict) -> HttpResponse:
    """What a DRF Response of `body` renders to, without building one: the hot path's answer."""
    return HttpResponse(_JSON.render(body), content_type=_JSON.media_type)


_JSON = JSONRenderer()


async def _answer(run: Run | Replay, chat_request: ChatRequest, slots: list[str]) -> HttpResponseBase:
    if isinstance(run, Replay):
        if chat_request.stream:
            return await _sse_response(replay_stream(run.body(), chat_request.include_usage), slots)
        return _json_response(run.body())
    if chat_request.stream:
        return await _sse_response(run_stream(run), slots)
    return _json_response(await run_complete(run))


class _JsonAnswers(BaseContentNegotiation):
    """The API answers JSON whatever the Accept header says, as OpenAI's does."""

    def select_renderer(self, request: Request, renderers: list[BaseRenderer], format_suffix=None):
        return renderers[0], renderers[0].media_type


class ApiView(APIView):
    """The /v1/ endpoints' base view."""

    content_negotiation_class = _JsonAnswers

    async def async_dispatch(self, request: HttpRequest, *args, **kwargs) -> HttpResponseBase:
        """adrf's, with DRF's `initial` (authentication: the token's read) run as the rest of the request's
        database work is (core.db.in_db_thread): on PostgreSQL several requests' token reads
        overlap, and the hop costs half of asgiref's."""
        self.args, self.kwargs = args, kwargs
        request = self.request = self.initialize_request(request, *args, **kwargs)
        self.headers = self.default_response_headers
        try:
            await self.async_initial(request, *args, **kwargs)
            method = request.method.lower()
            handler = getattr(self, method, None) if method in self.http_method_names else None
            if handler is None:
                self.http_method_not_allowed(request, *args, **kwargs)  # raises MethodNotAllowed
            if inspect.iscoroutinefunction(handler):
                response = await handler(request, *args, **kwargs)
            else:  # DRF's own, OPTIONS
                response = await in_db_thread(functools.partial(handler, request, *args, **kwargs))
        except Exception as exc:
            response = self.handle_exception(await self.exception_answered(request, exc))
        self.response = self.finalize_response(request, response, *args, **kwargs)
        return self.response

    takes_recent_tokens = False  # see chat.services.tokens.token_recent

    async def async_initial(self, request: Request, *args, **kwargs) -> None:
        """Who calls (chat.services.tokens: the token rule), found in the database pool, then DRF's `initial`
        with the user known: no database there."""
        raw = bearer_secret(request)
        caller = token_recent(raw) if self.takes_recent_tokens else None
        if caller is None and raw:
            caller = await in_db_thread(token_authenticate, raw=raw)
        if caller is None:
            return await in_db_thread(functools.partial(self.initial, request, *args, **kwargs))  # DRF's 401
        request.caller = caller
        request.user = request.auth = caller.token
        self.initial(request, *args, **kwargs)

    async def exception_answered(self, request: Request, exc: Exception) -> Exception:
        """The error to answer for `exc`: a 401 first when the caller was not confirmed and its token is no
        longer live."""
        caller = getattr(request, "caller", None)
        if caller is None or caller.confirmed:
            return exc
        return await in_db_thread(token_error_first, raw=bearer_secret(request), error=exc)

    def sync_dispatch(self, request: HttpRequest, *args, **kwargs) -> HttpResponseBase:
        # The read endpoints run whole in Django's thread hop. The API handler sends no request signals,
        # so the connection upkeep they would do happens here (the pool's threads do their own).
        connections_upkeep()
        return super().sync_dispatch(request, *args, **kwargs)

    def finalize_response(self, request: Request, response: HttpResponseBase, *args, **kwargs) -> HttpResponseBase:
        """A DRF Response is rendered here, on the event loop (it is one json.dumps): Django would render
        it in a thread hop of its own."""
        response = super().finalize_response(request, response, *args, **kwargs)
        if not isinstance(response, Response):
            return response  # a stream, or an answer rendered already
        response.render()
        return HttpResponse(response.content, status=response.status_code, headers=response.headers)


class ChatCompletionCreateApi(ApiView):
    """The hot path. A token this worker keeps is taken without a query (chat.services.tokens.token_recent):
    the write that starts the run checks the configuration it was read at is still current
    (chat.engine.start)."""

    takes_recent_tokens = True

    @chat_completion_schema
    async def post(self, request: Request) -> HttpResponseBase:
        chat_request = chat_request_parse(_body(request))
        async with Admitted(request.caller, chat_request.stream) as slots:
            run = await run_start(
                caller=request.caller, request=chat_request, request_id=request._request.kitemesh_request_id
            )
            request.caller = dataclasses.replace(request.caller, confirmed=True)  # the run's start checked it
            return await _answer(run, chat_request, slots)


class ChatResumeApi(ApiView):
    @chat_resume_schema
    async def post(self, request: Request) -> HttpResponseBase:
        resume = resume_request_parse(_body(request))
        async with Admitted(request.caller, resume.chat.stream) as slots:
            run = await run_resume(
                caller=request.caller, resume=resume, request_id=request._request.kitemesh_request_id
            )
            return await _answer(run, resume.chat, slots)


def _uuid(value: str, what: str, code: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"No {what} {value}.", code=code) from None


class ApprovalDetailApi(ApiView):
    @approval_detail_schema
    def get(self, request: Request, approval_id: str) -> Response:
        approval = approval_recovered_get(
            token=request.auth, approval_id=_uuid(approval_id, "approval", "approval_not_found")
        )
        approval_expire(approval=approval)  # expiry is also applied lazily, whenever an approval is touched
        approval = approval_with_calls_get(approval_id=approval.id)
        return Response(approval_body(approval))


class ExecutionDetailApi(ApiView):
    @execution_detail_schema
    def get(self, request: Request, execution_id: str) -> Response:
        execution_id = _uuid(execution_id, "execution", "execution_not_found")
        execution = execution_for_token_get(token=request.auth, execution_id=execution_id)
        if execution_recover_if_lapsed(execution=execution):
            execution = execution_for_token_get(token=request.auth, execution_id=execution_id)
        return Response(execution_body(execution))


class ModelListApi(ApiView):
    @model_list_schema
    def get(self, request: Request) -> Response:
        groups = group_list_for_caller(caller=request.caller)
        team = request.auth.team.name
        data = [{"id": g.model_id, "object": "model", "owned_by": team, "name": g.name} for g in groups]
        return Response({"object": "list", "data": data})


class CreditBalanceApi(ApiView):
    @credit_balance_schema
    def get(self, request: Request) -> Response:
        account = credit_account_get(team=request.auth.team)
        return Response(
            {
                "object": "credit_balance",
                "team": request.auth.team.name,
                "balance": account.balance,
                "held": account.held,
                "token": token_credits_body(token_spend(request.auth)),
            }
        )


@csrf_exempt
async def api_not_found_view(request: HttpRequest) -> JsonResponse:
    """Unknown API paths answer in the error envelope too."""
    return error_response(NotFound(f"No endpoint {request.method} {request.path}."), request)
