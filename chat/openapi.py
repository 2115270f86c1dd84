"""The OpenAPI description of the /v1/ API (served at /api/schema/, shown at /api/docs/).

The views parse JSON by hand (chat.wire) and build their bodies as dicts, so nothing here validates or
renders anything: these serializers only *describe* the wire shapes for drf-spectacular. They must say
what chat.wire accepts and returns; tests/site/test_openapi.py checks live responses against them.
Docstrings and help texts end up in the published schema, so they are written for API clients."""

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
    extend_schema_field,
)
from rest_framework import serializers

from chat.wire import MAX_OUTPUT_TOKENS
from core.models import Approval, Execution, Mode, Step, Tool, ToolExecution

# The mode a request actually ran in: `auto` is resolved before anything runs, so it is never reported.
RUN_MODES = [Mode.NORMAL.value, Mode.SYNTHESIS.value, Mode.ORCHESTRATION.value]
ERROR_TYPES = [
    "invalid_request_error",
    "authentication_error",
    "insufficient_credits",
    "permission_error",
    "not_found_error",
    "conflict_error",
    "approval_expired",
    "rate_limit_error",
    "upstream_error",
    "server_error",
]
PROGRESS_STATUSES = ["started", "done", "failed"]
UUID_PATTERN = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
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


# --- Fields whose JSON type is a union (no serializer field says that) ------------------------------

TEXT_PART_SCHEMA = {
    "type": "object",
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    "required": ["type", "text"],
}


@extend_schema_field(
    {
        "oneOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART_SCHEMA}],
        "description": "A string, or a list of text parts.",
    }
)
class MessageContentField(serializers.JSONField):
    pass


@extend_schema_field(
    {
        # `nullable` sits on a branch: next to a oneOf without a type it would mean nothing in OpenAPI 3.0.
        "oneOf": [{"type": "string", "nullable": True}, {"type": "array", "items": TEXT_PART_SCHEMA}],
        "description": "A string, a list of text parts, or null (with `tool_calls`).",
    }
)
class AssistantContentField(serializers.JSONField):
    pass


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string", "nullable": True},
            {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        ],
        "description": "Up to 4 sequences where the brain model stops; passed to it as given.",
    }
)
class StopField(serializers.JSONField):
    pass


@extend_schema_field(
    {
        "type": "object",
        "nullable": True,
        "properties": {
            "request_id": {
                "type": "string",
                "minLength": 1,
                "maxLength": 128,
                "description": "Idempotency key per team: the same id with the same body returns the first "
                "result (no second charge); with another body it is 409 `request_id_conflict`. Also the "
                "request's id in `X-Request-ID` and every error.",
            },
            "mode": {
                "type": "string",
                "enum": list(Mode.values),
                "description": "Overrides the group's default mode for this request.",
            },
        },
        "additionalProperties": True,
        "description": "Other keys are stored on the execution as given.",
    }
)
class MetadataField(serializers.JSONField):
    pass


@extend_schema_field({"description": "The arguments as JSON, with secret values redacted."})
class RedactedArgumentsField(serializers.JSONField):
    pass


# --- Requests ---------------------------------------------------------------------------------------


class ToolCallFunctionSerializer(serializers.Serializer):
    # allow_blank throughout the request shapes: chat.wire checks types, not lengths, and an empty string passes.
    name = serializers.CharField(allow_blank=True)
    arguments = serializers.CharField(allow_blank=True, help_text="The arguments as a JSON string.")


class ChatToolCallSerializer(serializers.Serializer):
    """A tool call. In an answer that pauses for approval, `id` is the tool execution's UUID: the id to
    approve or deny in POST /v1/chat/resume."""

    id = serializers.CharField(allow_blank=True)
    type = serializers.ChoiceField(choices=["function"])
    function = ToolCallFunctionSerializer()


class ChatSystemMessageSerializer(serializers.Serializer):
    """Instructions for the group: `system`, or `developer` (the same to KiteMesh)."""

    role = serializers.ChoiceField(choices=["system", "developer"])
    content = MessageContentField()
    name = serializers.CharField(required=False, allow_blank=True)


class ChatUserMessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["user"])
    content = MessageContentField()
    name = serializers.CharField(required=False, allow_blank=True)


class ChatAssistantMessageSerializer(serializers.Serializer):
    """An earlier answer. `content` may be null or left out only when `tool_calls` is given."""

    role = serializers.ChoiceField(choices=["assistant"])
    content = AssistantContentField(required=False)
    tool_calls = serializers.ListField(child=ChatToolCallSerializer(), required=False, allow_null=True, min_length=1)
    name = serializers.CharField(required=False, allow_blank=True)


class ChatToolMessageSerializer(serializers.Serializer):
    """A tool's result, answering the assistant's tool call `tool_call_id`."""

    role = serializers.ChoiceField(choices=["tool"])
    content = MessageContentField()
    tool_call_id = serializers.CharField(allow_blank=True)


def _messages(**kwargs: Any) -> serializers.ListField:
    """A list of messages, each typed by its `role` (chat.wire._messages_check). A ListField, not many=True:
    only its min_length reaches the schema as minItems."""
    message = PolymorphicProxySerializer(
        component_name="ChatMessage",
        serializers={
            "system": ChatSystemMessageSerializer,
            "developer": ChatSystemMessageSerializer,
            "user": ChatUserMessageSerializer,
            "assistant": ChatAssistantMessageSerializer,
            "tool": ChatToolMessageSerializer,
        },
        resource_type_field_name="role",
    )
    return serializers.ListField(child=message, **kwargs)


class ResponseFormatSerializer(serializers.Serializer):
    type = serializers.CharField(
        allow_blank=True, help_text="For example `text` or `json_object`; passed to the brain model."
    )


class StreamOptionsSerializer(serializers.Serializer):
    include_usage = serializers.BooleanField(
        required=False, help_text="Send a last chunk with `usage` and empty `choices` before `[DONE]`."
    )


class _ChatParametersSerializer(serializers.Serializer):
    """What completions and resume share (chat.wire.chat_request_parse). Unknown fields are ignored."""

    model = serializers.RegexField(
        f"^group:{UUID_PATTERN}$", help_text="`group:<uuid>`: the group that answers (GET /v1/models lists them)."
    )
    stream = serializers.BooleanField(
        required=False, allow_null=True, default=False, help_text="true: answer as server-sent events."
    )
    max_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=MAX_OUTPUT_TOKENS)
    max_completion_tokens = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=MAX_OUTPUT_TOKENS,
        help_text="Wins over `max_tokens` when both are given.",
    )
    temperature = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=2)
    top_p = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=1)
    stop = StopField(required=False)
    seed = serializers.IntegerField(required=False, allow_null=True)
    response_format = ResponseFormatSerializer(required=False, allow_null=True)
    user = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    metadata = MetadataField(required=False, allow_null=True)
    stream_options = StreamOptionsSerializer(required=False, allow_null=True)


class CreateChatCompletionSerializer(_ChatParametersSerializer):
    """A chat completion request: the group answers the conversation. A violation of any rule is a 400
    naming the field in `param`, and nothing is called upstream."""

    messages = _messages(min_length=1, help_text="The conversation; at least one `user` message.")


class DeniedToolSerializer(serializers.Serializer):
    tool_execution_id = serializers.UUIDField()
    reason = serializers.CharField(required=False, allow_null=True, allow_blank=True)


class ChatResumeSerializer(_ChatParametersSerializer):
    """Continue a run paused for approval: decide its tool calls (here or on the approver page) and let the
    group go on. Every call needing a decision needs one; `model` must name the approval's group."""

    approval_id = serializers.UUIDField(help_text="`kitemesh.approval_id` of the paused answer.")
    approved_tool_execution_ids = serializers.ListField(child=serializers.UUIDField(), required=False, allow_null=True)
    denied_tools = DeniedToolSerializer(many=True, required=False, allow_null=True)
    messages = _messages(required=False, allow_null=True, help_text="Optional; appended after the tool results.")


# --- Responses --------------------------------------------------------------------------------------


class UsageSerializer(serializers.Serializer):
    """Tokens of every model call of the request (all agents and the brain)."""

    prompt_tokens = serializers.IntegerField(min_value=0)
    completion_tokens = serializers.IntegerField(min_value=0)
    total_tokens = serializers.IntegerField(min_value=0)


class KitemeshInfoSerializer(serializers.Serializer):
    """What KiteMesh adds to an answer. `approval_id` and `expires_at` are present when the run paused for
    approval."""

    execution_id = serializers.UUIDField()
    request_id = serializers.CharField()
    mode = serializers.ChoiceField(choices=RUN_MODES, help_text="The mode the request ran in.")
    credits_charged = serializers.IntegerField(min_value=0, help_text="This request's charge.")
    approval_id = serializers.UUIDField(required=False)
    expires_at = serializers.DateTimeField(required=False, help_text="When the approval expires (UTC).")


class AssistantMessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["assistant"])
    content = serializers.CharField(allow_null=True, allow_blank=True, help_text="null when the run paused.")
    tool_calls = ChatToolCallSerializer(
        many=True, required=False, help_text="On a pause: the calls that need a decision."
    )


class ChatCompletionChoiceSerializer(serializers.Serializer):
    index = serializers.IntegerField(min_value=0)
    message = AssistantMessageSerializer()
    finish_reason = serializers.CharField(
        help_text="`stop`, `length`, … as the brain model said; `tool_calls` on a pause."
    )


class ChatCompletionSerializer(serializers.Serializer):
    """A chat completion: the group's answer, or a pause for approval (`finish_reason` `tool_calls`,
    `message.content` null, `kitemesh.approval_id`)."""

    id = serializers.CharField()
    object = serializers.ChoiceField(choices=["chat.completion"])
    created = serializers.IntegerField(help_text="Unix time.")
    model = serializers.CharField()
    choices = ChatCompletionChoiceSerializer(many=True)
    usage = UsageSerializer()
    kitemesh = KitemeshInfoSerializer()


class ProgressSerializer(serializers.Serializer):
    agent = serializers.CharField()
    status = serializers.ChoiceField(choices=PROGRESS_STATUSES)


class KitemeshChunkInfoSerializer(KitemeshInfoSerializer):
    """KiteMesh's part of a chunk: on the last chunk (with `credits_charged`), on the approval chunk, and on
    agent progress chunks (`progress`, with an empty delta)."""

    credits_charged = serializers.IntegerField(min_value=0, required=False)
    progress = ProgressSerializer(required=False)


class ChunkToolCallSerializer(ChatToolCallSerializer):
    index = serializers.IntegerField(min_value=0)


class ChunkDeltaSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["assistant"], required=False)
    content = serializers.CharField(required=False, allow_blank=True)
    tool_calls = ChunkToolCallSerializer(
        many=True, required=False, help_text="The approval chunk: every call needing a decision, complete."
    )


class ChunkChoiceSerializer(serializers.Serializer):
    index = serializers.IntegerField(min_value=0)
    delta = ChunkDeltaSerializer()
    finish_reason = serializers.CharField(allow_null=True)


class ChatCompletionChunkSerializer(serializers.Serializer):
    """One `data:` event of a stream. The include_usage chunk has `usage` and empty `choices`."""

    id = serializers.CharField()
    object = serializers.ChoiceField(choices=["chat.completion.chunk"])
    created = serializers.IntegerField()
    model = serializers.CharField()
    choices = ChunkChoiceSerializer(many=True)
    usage = UsageSerializer(required=False)
    kitemesh = KitemeshChunkInfoSerializer(required=False)


class ModelSerializer(serializers.Serializer):
    id = serializers.CharField(help_text="`group:<uuid>`, the `model` of a completion request.")
    object = serializers.ChoiceField(choices=["model"])
    owned_by = serializers.CharField(help_text="The team's name.")
    name = serializers.CharField(help_text="The group's name.")


class ModelListSerializer(serializers.Serializer):
    """The groups this token may use."""

    object = serializers.ChoiceField(choices=["list"])
    data = ModelSerializer(many=True)


class CreditBalanceSerializer(serializers.Serializer):
    """The token's team's credits: `balance`, of which `held` is reserved by requests in flight."""

    object = serializers.ChoiceField(choices=["credit_balance"])
    team = serializers.CharField()
    balance = serializers.IntegerField(min_value=0)
    held = serializers.IntegerField(min_value=0)


class ApprovalToolExecutionSerializer(serializers.Serializer):
    """A tool call of the approval, as an approver sees it. `method`, `host` and `path` are null when the
    tool has been deleted since."""

    id = serializers.UUIDField(help_text="The tool execution id, to approve or deny.")
    tool = serializers.CharField()
    method = serializers.ChoiceField(choices=Tool.Method.choices, allow_null=True)
    host = serializers.CharField(allow_null=True)
    path = serializers.CharField(allow_null=True, allow_blank=True)
    arguments = RedactedArgumentsField()
    risk = serializers.ChoiceField(choices=Tool.Risk.choices)
    requires_approval = serializers.BooleanField()
    status = serializers.ChoiceField(choices=ToolExecution.Status.choices)
    decision = serializers.ChoiceField(choices=["approved", "denied"], allow_null=True)
    reason = serializers.CharField(allow_blank=True)
    decided_by = serializers.CharField(allow_null=True, help_text="A user name, or `token:<name>`.")
    decided_via = serializers.ChoiceField(
        choices=ToolExecution.DecidedVia.choices,
        allow_null=True,
        help_text="`auto` (needed no approval), `api` (POST /v1/chat/resume) or `ui` (the approver page).",
    )
    decided_at = serializers.DateTimeField(allow_null=True)


class ApprovalSerializer(serializers.Serializer):
    """A round of tool calls paused for decisions. Reading it also applies its expiry."""

    object = serializers.ChoiceField(choices=["approval"])
    id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=Approval.Status.choices)
    execution_id = serializers.UUIDField()
    model = serializers.CharField()
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField()
    tool_executions = ApprovalToolExecutionSerializer(many=True)


class _StepSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=Step.Status.choices)
    prompt_tokens = serializers.IntegerField(min_value=0)
    completion_tokens = serializers.IntegerField(min_value=0)
    usage_estimated = serializers.BooleanField(help_text="The upstream reported no usage: ceil(characters / 4).")
    latency_ms = serializers.IntegerField(min_value=0)
    error = serializers.CharField(allow_null=True)


class ModelCallStepSerializer(_StepSerializer):
    """A call of the brain or an agent."""

    kind = serializers.ChoiceField(choices=[Step.Kind.MODEL_CALL.value])
    model = serializers.CharField(allow_blank=True)
    agent = serializers.CharField(allow_null=True, help_text="The agent's name; null for the brain.")


class ToolCallStepSerializer(_StepSerializer):
    """A tool run."""

    kind = serializers.ChoiceField(choices=[Step.Kind.TOOL_CALL.value])
    tool = serializers.CharField(allow_blank=True)


class ExecutionApprovalSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=Approval.Status.choices)


class ExecutionErrorSerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=ERROR_TYPES)
    code = serializers.CharField()
    message = serializers.CharField()


class ExecutionSerializer(serializers.Serializer):
    """A run through a group (a completion and its resumes): every model call and tool run as a step,
    usage and credits in total."""

    object = serializers.ChoiceField(choices=["execution"])
    id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=Execution.Status.choices)
    model = serializers.CharField(allow_null=True, help_text="null when the group has been deleted since.")
    group = serializers.CharField(allow_null=True, help_text="The group's name.")
    mode = serializers.ChoiceField(choices=RUN_MODES)
    request_id = serializers.CharField()
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    usage = UsageSerializer()
    credits_charged = serializers.IntegerField(min_value=0)
    error = ExecutionErrorSerializer(
        allow_null=True,
        help_text="Why a failed run failed: for example `upstream_error`, or `run_interrupted` when the process "
        "running it stopped (what it completed was charged).",
    )
    steps = PolymorphicProxySerializer(
        component_name="ExecutionStep",
        serializers={
            Step.Kind.MODEL_CALL.value: ModelCallStepSerializer,
            Step.Kind.TOOL_CALL.value: ToolCallStepSerializer,
        },
        resource_type_field_name="kind",
        many=True,
    )
    approvals = ExecutionApprovalSerializer(many=True)


class ErrorDetailSerializer(serializers.Serializer):
    message = serializers.CharField()
    type = serializers.ChoiceField(choices=ERROR_TYPES)
    code = serializers.CharField(help_text="For example `model_not_found`, `decision_required`, `upstream_timeout`.")
    param = serializers.CharField(
        required=False, help_text="The field at fault, dotted (`messages.2.content`); only on field errors."
    )
    request_id = serializers.CharField(help_text="The same id as the `X-Request-ID` header.")


class ErrorSerializer(serializers.Serializer):
    """Every API error, whatever its status."""

    error = ErrorDetailSerializer()


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
    return OpenApiResponse(ErrorSerializer, description=description)


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
            ChatCompletionSerializer,
            description="The answer, or a pause for approval (`finish_reason` `tool_calls`): JSON, or "
            "server-sent events with `stream: true` (see the text/event-stream schema).",
        ),
        # Declared with the chunk serializer so the component is generated; chat_answer_postprocess then makes
        # the media type's schema what the body really is: text.
        (200, SSE_MEDIA_TYPE): ChatCompletionChunkSerializer,
    }


chat_completion_schema = extend_schema(
    operation_id="createChatCompletion",
    tags=["Chat"],
    summary="Create a chat completion",
    description="The group answers the conversation (OpenAI-compatible). The run may pause for approval when "
    "the brain calls a tool that needs it; continue it with POST /v1/chat/resume.",
    request={"application/json": CreateChatCompletionSerializer},
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
    request={"application/json": ChatResumeSerializer},
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
    responses={200: OpenApiResponse(ApprovalSerializer, description="The approval."), **_errors(401, 404)},
)

execution_detail_schema = extend_schema(
    operation_id="retrieveExecution",
    tags=["Executions"],
    summary="Retrieve an execution",
    parameters=[
        OpenApiParameter("execution_id", OpenApiTypes.UUID, OpenApiParameter.PATH),
        X_REQUEST_ID,
    ],
    responses={200: OpenApiResponse(ExecutionSerializer, description="The execution."), **_errors(401, 404)},
)

model_list_schema = extend_schema(
    operation_id="listModels",
    tags=["Models"],
    summary="List the groups the token may use",
    parameters=[X_REQUEST_ID],
    responses={200: OpenApiResponse(ModelListSerializer, description="The groups, as OpenAI models."), **_errors(401)},
)

credit_balance_schema = extend_schema(
    operation_id="retrieveCreditBalance",
    tags=["Credits"],
    summary="The team's credit balance",
    parameters=[X_REQUEST_ID],
    responses={200: OpenApiResponse(CreditBalanceSerializer, description="The balance."), **_errors(401)},
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
