"""The OpenAI-compatible API. Views only speak HTTP: parse, call the engine or a selector, answer."""

from collections.abc import AsyncIterator

from adrf.views import APIView
from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework.request import Request
from rest_framework.response import Response

from billing.selectors import credit_account_get
from chat.engine.runner import Replay, replay_stream, run_complete, run_start, run_stream
from chat.errors import NotFound
from chat.selectors import group_for_token_get, group_list_for_token
from chat.wire import body_parse, chat_request_parse, client_request_id, error_response


async def _sse_response(stream: AsyncIterator[bytes]) -> StreamingHttpResponse:
    """Wait for the first event before answering, so an error that comes first (upstream down) is a
    plain HTTP error, not a stream that fails."""
    first = await anext(stream)

    async def events() -> AsyncIterator[bytes]:
        try:
            yield first
            async for event in stream:
                yield event
        finally:
            await stream.aclose()  # a disconnect closes this wrapper: settle the run now, not at GC

    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


class ChatCompletionCreateApi(APIView):
    async def post(self, request: Request) -> HttpResponseBase:
        body = body_parse(request.body)
        request._request.kitemesh_request_id = client_request_id(body) or request._request.kitemesh_request_id
        chat_request = chat_request_parse(body)
        token = request.auth
        group = await sync_to_async(group_for_token_get)(token=token, group_id=chat_request.group_id)
        run = await run_start(
            token=token, group=group, request=chat_request, request_id=request._request.kitemesh_request_id
        )
        if isinstance(run, Replay):
            if chat_request.stream:
                return await _sse_response(replay_stream(run.body(), chat_request.include_usage))
            return Response(run.body())
        if chat_request.stream:
            return await _sse_response(run_stream(run))
        return Response(await run_complete(run))


class ModelListApi(APIView):
    def get(self, request: Request) -> Response:
        groups = group_list_for_token(token=request.auth)
        team = request.auth.team.name
        data = [{"id": g.model_id, "object": "model", "owned_by": team, "name": g.name} for g in groups]
        return Response({"object": "list", "data": data})


class CreditBalanceApi(APIView):
    def get(self, request: Request) -> Response:
        account = credit_account_get(team=request.auth.team)
        return Response(
            {
                "object": "credit_balance",
                "team": request.auth.team.name,
                "balance": account.balance,
                "held": account.held,
            }
        )


@csrf_exempt
async def api_not_found_view(request: HttpRequest) -> JsonResponse:
    """Unknown API paths answer in the error envelope too."""
    return error_response(NotFound(f"No endpoint {request.method} {request.path}."), request)
