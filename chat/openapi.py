"""The OpenAPI description of the /v1/ API (served at /api/schema/, shown at /api/docs/): each operation with
its request and answer shapes, which are chat.wire's pydantic models (drf-spectacular's pydantic extension
turns them into components), its errors, headers and examples. Docstrings and descriptions end up in the
published schema, so they are written for API clients."""

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema

from chat.wire.requests import ChatResume, CreateChatCompletion
from chat.wire.responses import (
    Approval,
    ChatCompletion,
    ChatCompletionChunk,
    CreditBalance,
    Error,
    Execution,
    ModelList,
)

SSE_MEDIA_TYPE = "text/event-stream"
CHUNK_COMPONENT = "ChatCompletionChunk"


# --- Security ---------------------------------------------------------------------------------------


class ApiTokenScheme(OpenApiAuthenticationExtension):
    """`Authorization: Bearer km_…` (chat.authentication). Registered by being imported (chat.api does)."""

    target_class = "chat.authentication.ApiTokenAuthentication"
    name = "ApiToken"

    def get_security_definition(self, auto_schema: Any) -> dict:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "km_ token",
            "description": "An API token (`km_…`, shown once when issued). Its team pays; its scope limits the "
            "groups and tools it may use.",
        }


# --- Operations -------------------------------------------------------------------------------------

X_REQUEST_ID = OpenApiParameter(
    "X-Request-ID",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    response=True,
    description="`metadata.request_id` when the client gave one, else a generated `req_…`.",
)
RETRY_AFTER = OpenApiParameter(
    "Retry-After", OpenApiTypes.INT, OpenApiParameter.HEADER, response=[429], description="Seconds to wait."
)


def _error(description: str) -> OpenApiResponse:
    return OpenApiResponse(Error, description=description)


ERRORS = {
    400: _error("Invalid request: `param` names the field (`invalid_request_error`, `invalid_json`, …)."),
    401: _error("Missing, invalid, expired or revoked token (`authentication_error`)."),
    402: _error("The team's credits cannot cover the request's worst case (`insufficient_credits`)."),
    403: _error("Outside the token's scope (`permission_denied`)."),
    404: _error("Unknown or another team's resource (`model_not_found`, `approval_not_found`, …)."),
    409: _error("Conflict (`request_id_conflict`, `approval_already_resumed`, `decision_required`, …)."),
    410: _error("The approval has expired (`approval_expired`); its hold is released."),
    413: _error("The body is larger than KITEMESH_MAX_BODY_BYTES (`request_too_large`)."),
    429: _error("Over a rate limit of the token or team (`rate_limit_exceeded`); see `Retry-After`."),
    502: _error("An upstream model failed (`upstream_error`); its body is never echoed."),
    504: _error("An upstream model timed out (`upstream_timeout`)."),
}


def _errors(*statuses: int) -> dict:
    return {status: ERRORS[status] for status in statuses}


SSE_DESCRIPTION = (
    "With `stream: true`: server-sent events. Each event is `data: <JSON>` holding a "
    f"`{CHUNK_COMPONENT}` (see that schema): text arrives as `choices[0].delta.content` as the model writes it; "
    "the chunk with the final `finish_reason` carries `kitemesh` (`execution_id`, `credits_charged`, "
    "`request_id`); a pause for approval is one chunk with the complete `delta.tool_calls`, `finish_reason` "
    "`tool_calls` and `kitemesh.approval_id` / `expires_at`. With `stream_options.include_usage` a last chunk "
    'has `usage` and empty `choices`. An error after the stream started is one `data: {"error": …}` event '
    "(the Error envelope). The stream always ends with `data: [DONE]`."
)
SSE_EXAMPLE = (
    'data: {"id":"chatcmpl_1","object":"chat.completion.chunk","created":1712345678,"model":"group:…",'
    '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    'data: {"id":"chatcmpl_1","object":"chat.completion.chunk","created":1712345678,"model":"group:…",'
    '"choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}\n\n'
    'data: {"id":"chatcmpl_1","object":"chat.completion.chunk","created":1712345678,"model":"group:…",'
    '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"kitemesh":{"execution_id":"…",'
    '"request_id":"req_…","mode":"normal","credits_charged":1}}\n\n'
    "data: [DONE]\n\n"
)

GROUP = "group:00000000-0000-4000-8000-000000000001"
COMPLETION_EXAMPLES = [
    OpenApiExample(
        "Hello",
        request_only=True,
        value={
            "model": GROUP,
            "messages": [{"role": "user", "content": "Hello"}],
            "metadata": {"request_id": "req_demo_001"},
        },
    ),
    OpenApiExample(
        "Answer",
        response_only=True,
        media_type="application/json",
        value={
            "id": "chatcmpl_5f0c3b1d2e4a6b8c9d0e1f2a",
            "object": "chat.completion",
            "created": 1712345678,
            "model": GROUP,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 84, "total_tokens": 204},
            "kitemesh": {
                "execution_id": "3f6c2d9e-8b1a-4c5d-9e7f-0a1b2c3d4e5f",
                "credits_charged": 3,
                "request_id": "req_demo_001",
                "mode": "normal",
            },
        },
    ),
    OpenApiExample(
        "Paused for approval",
        response_only=True,
        media_type="application/json",
        value={
            "id": "chatcmpl_5f0c3b1d2e4a6b8c9d0e1f2b",
            "object": "chat.completion",
            "created": 1712345678,
            "model": GROUP,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "8d3e1c2b-4a5f-4e6d-8c7b-9a0f1e2d3c4b",
                                "type": "function",
                                "function": {"name": "create_ticket", "arguments": '{"priority": "high"}'},
                            }
                        ],
                    },
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
            "kitemesh": {
                "approval_id": "1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e",
                "execution_id": "3f6c2d9e-8b1a-4c5d-9e7f-0a1b2c3d4e5f",
                "expires_at": "2024-04-05T19:49:38Z",
                "request_id": "req_…",
                "credits_charged": 2,
                "mode": "normal",
            },
        },
    ),
]


def _chat_responses() -> dict:
    return {
        (200, "application/json"): OpenApiResponse(
            ChatCompletion,
            description="The answer, or a pause for approval (`finish_reason` `tool_calls`): JSON, or "
            "server-sent events with `stream: true` (see the text/event-stream schema).",
        ),
        # Declared with the chunk model so the component is generated; chat_answer_postprocess then makes
        # the media type's schema what the body really is: text.
        (200, SSE_MEDIA_TYPE): ChatCompletionChunk,
    }


chat_completion_schema = extend_schema(
    operation_id="createChatCompletion",
    tags=["Chat"],
    summary="Create a chat completion",
    description="The group answers the conversation (OpenAI-compatible). The run may pause for approval when "
    "the brain calls a tool that needs it; continue it with POST /v1/chat/resume.",
    request={"application/json": CreateChatCompletion},
    responses={**_chat_responses(), **_errors(400, 401, 402, 403, 404, 409, 413, 429, 502, 504)},
    parameters=[X_REQUEST_ID, RETRY_AFTER],
    examples=COMPLETION_EXAMPLES,
)

chat_resume_schema = extend_schema(
    operation_id="resumeChatCompletion",
    tags=["Chat"],
    summary="Resume a run paused for approval",
    description="Approve or deny the paused tool calls and continue the run. Approved calls run exactly once; "
    "denied ones do not run and the model is told why. The answer has the shapes of POST /v1/chat/completions "
    "(stream or not) and may pause again with a new `approval_id`, same `execution_id`. An approval resumes "
    "once (409 `approval_already_resumed`); past `expires_at` it is 410.",
    request={"application/json": ChatResume},
    responses={**_chat_responses(), **_errors(400, 401, 402, 403, 404, 409, 410, 413, 429, 502, 504)},
    parameters=[X_REQUEST_ID, RETRY_AFTER],
)

approval_detail_schema = extend_schema(
    operation_id="retrieveApproval",
    tags=["Approvals"],
    summary="Retrieve an approval",
    parameters=[
        OpenApiParameter("approval_id", OpenApiTypes.UUID, OpenApiParameter.PATH),
        X_REQUEST_ID,
    ],
    responses={200: OpenApiResponse(Approval, description="The approval."), **_errors(401, 404)},
)

execution_detail_schema = extend_schema(
    operation_id="retrieveExecution",
    tags=["Executions"],
    summary="Retrieve an execution",
    parameters=[
        OpenApiParameter("execution_id", OpenApiTypes.UUID, OpenApiParameter.PATH),
        X_REQUEST_ID,
    ],
    responses={200: OpenApiResponse(Execution, description="The execution."), **_errors(401, 404)},
)

model_list_schema = extend_schema(
    operation_id="listModels",
    tags=["Models"],
    summary="List the groups the token may use",
    parameters=[X_REQUEST_ID],
    responses={200: OpenApiResponse(ModelList, description="The groups, as OpenAI models."), **_errors(401)},
)

credit_balance_schema = extend_schema(
    operation_id="retrieveCreditBalance",
    tags=["Credits"],
    summary="The team's credit balance",
    parameters=[X_REQUEST_ID],
    responses={200: OpenApiResponse(CreditBalance, description="The balance."), **_errors(401)},
)


# --- Hooks (SPECTACULAR_SETTINGS) -------------------------------------------------------------------


def api_endpoints_only(endpoints: list[tuple], **kwargs: Any) -> list[tuple]:
    """Preprocessing hook: the schema describes the /v1/ API, never pages, admin or the docs views."""
    return [endpoint for endpoint in endpoints if endpoint[0].startswith("/v1/")]


# What a chat answer leads to (OpenAPI links: shown in the docs, followed by stateful API testers).
ANSWER_LINKS = {
    "execution": {
        "operationId": "retrieveExecution",
        "parameters": {"execution_id": "$response.body#/kitemesh/execution_id"},
        "description": "The run this answer belongs to.",
    },
    "approval": {
        "operationId": "retrieveApproval",
        "parameters": {"approval_id": "$response.body#/kitemesh/approval_id"},
        "description": "The approval the run paused for (only on a pause).",
    },
}


def chat_answer_postprocess(result: dict, generator: Any, **kwargs: Any) -> dict:
    """Postprocessing hook for the chat operations' 200 answers, which drf-spectacular cannot express:

    - a streamed answer is text, each `data:` line a chunk. OpenAPI 3.0 cannot type the events, so the media
      type says string and points at the chunk component in an extension;
    - the links from an answer to its execution and approval."""
    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            ok = operation.get("responses", {}).get("200", {}) if isinstance(operation, dict) else {}
            if SSE_MEDIA_TYPE in ok.get("content", {}):
                ok["content"][SSE_MEDIA_TYPE] = {
                    "schema": {"type": "string", "description": SSE_DESCRIPTION, "example": SSE_EXAMPLE},
                    "x-event-data-schema": {"$ref": f"#/components/schemas/{CHUNK_COMPONENT}"},
                }
                ok["links"] = ANSWER_LINKS
    return result
