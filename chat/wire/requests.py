"""The API's request bodies, each defined once as a pydantic model: their validation and their OpenAPI
description (chat.openapi) both come from it. Validation is strict — "10" is not a number, 1 is not a
boolean — and a violation is a 400 naming the field in `param`, dotted as the SPEC has it (`messages.2.content`).
Unknown top-level fields are ignored; a message's other fields are kept and sent on as given. What passes is
read into ChatRequest, the engine's view of a request.

Pydantic over DRF serializers: strict types without writing them, errors that carry their place, a JSON
Schema of the same classes, and validation in Rust (a completion body in tens of microseconds)."""

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)
from pydantic_core import PydanticCustomError

from chat.wire.body import REQUEST_ID
from core.errors import InvalidRequest
from core.models import Mode
from core.tool_arguments import edit_invalid, edit_param

# No model writes a million tokens in one answer; a larger cap only inflates the worst case a run holds.
MAX_OUTPUT_TOKENS = 1_000_000
PASSTHROUGH_FIELDS = ("top_p", "stop", "seed", "response_format", "user")  # sent to the brain as given
UUID_PATTERN = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


class _Shape(BaseModel):
    model_config = ConfigDict(strict=True)


class _Open(BaseModel):
    """A shape whose other fields are kept (a message's `name`, a part's extras): they are sent on as given."""

    model_config = ConfigDict(strict=True, extra="allow")


def reported_as(message: str) -> WrapValidator:
    """Any error inside the value is reported once, at the value itself, with `message` (a content part, a
    tool call: `param` names the item, not the key inside it)."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid", message) from None

    return WrapValidator(validate)


# --- Messages ----------------------------------------------------------------------------------------------


class TextPart(_Open):
    type: Literal["text"]
    text: str


Content = Annotated[
    str | list[Annotated[TextPart, reported_as('Each content part must be {"type": "text", "text": "…"}.')]],
    Field(description="A string, or a list of text parts."),
]


class FunctionCall(_Shape):
    name: Annotated[str, Field(pattern="^[A-Za-z0-9_-]{1,64}$", description="1 to 64 letters, digits, _ or -.")]
    arguments: Annotated[str, Field(description="The arguments as a JSON string.")]


class ToolCall(_Open):
    """A tool call. In an answer that pauses for approval, `id` is the tool execution's UUID: the id to approve
    or deny in POST /v1/chat/resume."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


def _tool_call_checked(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A malformed tool call is reported at the call; a function name that breaks the rule, at the name."""
    try:
        return handler(value)
    except ValidationError as error:
        if all(e["type"] == "string_pattern_mismatch" for e in error.errors()):
            raise
        message = "Each tool call needs id, type 'function' and function.name/arguments strings."
        raise PydanticCustomError("invalid", message) from None


class _Message(_Open):
    name: str | None = None


class SystemMessage(_Message):
    """Instructions for the group: `system`, or `developer` (the same to KiteMesh)."""

    role: Literal["system", "developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    """An earlier answer. `content` may be null or left out only when `tool_calls` is given."""

    role: Literal["assistant"]
    tool_calls: Annotated[list[Annotated[ToolCall, WrapValidator(_tool_call_checked)]], Field(min_length=1)] | None = (
        None
    )
    content: Content | None = Field(default=None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_unless_tool_calls(cls, content: Any, info: Any) -> Any:
        if content is None and not info.data.get("tool_calls"):
            raise PydanticCustomError("invalid", "content is required, unless the message has tool_calls.")
        return content


class ToolMessage(_Message):
    """A tool's result, answering the assistant's tool call `tool_call_id`."""

    role: Literal["tool"]
    tool_call_id: str
    content: Content


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


# --- The chat parameters ---------------------------------------------------------------------------------


def _group_id(model: str) -> str:
    try:
        uuid.UUID(model.removeprefix("group:"))
    except ValueError:
        raise PydanticCustomError("invalid", "model must be 'group:<uuid>'.") from None
    if not model.startswith("group:"):
        raise PydanticCustomError("invalid", "model must be 'group:<uuid>'.")
    return model


class ResponseFormat(_Open):
    type: Annotated[str, Field(description="For example `text` or `json_object`; passed to the brain model.")]


class StreamOptions(_Shape):
    include_usage: Annotated[
        bool, Field(description="Send a last chunk with `usage` and empty `choices` before `[DONE]`.")
    ] = False


class Metadata(_Open):
    """Other keys are stored on the execution as given."""

    request_id: (
        Annotated[
            str,
            Field(
                pattern=f"^{REQUEST_ID.pattern}$",
                description="Idempotency key per team: the same id with the same body returns the first result (no "
                "second charge); with another body it is 409 `request_id_conflict`. Also the request's id in "
                "`X-Request-ID` and every error. 1 to 128 printable ASCII characters.",
            ),
        ]
        | None
    ) = None
    mode: (
        Annotated[
            Literal[tuple(Mode.values)], Field(description="Overrides the group's default mode for this request.")
        ]
        | None
    ) = None


Tokens = Annotated[int, Field(ge=1, le=MAX_OUTPUT_TOKENS)]
Stop = Annotated[
    str | Annotated[list[str], Field(max_length=4)],
    reported_as("stop must be a string or an array of at most 4 strings."),
    Field(description="Up to 4 sequences where the brain model stops; passed to it as given."),
]


class ChatParameters(_Shape):
    """What completions and resume share. Unknown fields are ignored."""

    model: Annotated[
        str,
        AfterValidator(_group_id),
        Field(
            description="`group:<uuid>`: the group that answers (GET /v1/models lists them).",
            json_schema_extra={"pattern": f"^group:{UUID_PATTERN}$"},
        ),
    ]
    stream: Annotated[bool, Field(description="true: answer as server-sent events.")] | None = None
    max_tokens: Tokens | None = None
    max_completion_tokens: (
        Annotated[Tokens, Field(description="Wins over `max_tokens` when both are given.")] | None
    ) = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stop: Stop | None = None
    seed: int | None = None
    response_format: Annotated[ResponseFormat, reported_as("response_format must be an object with a type.")] | None = (
        None
    )
    user: str | None = None
    metadata: Metadata | None = None
    stream_options: StreamOptions | None = None


class CreateChatCompletion(ChatParameters):
    """A chat completion request: the group answers the conversation. A violation of any rule is a 400 naming
    the field in `param`, and nothing is called upstream."""

    messages: Annotated[
        list[Message], Field(min_length=1, description="The conversation; at least one `user` message.")
    ]

    @field_validator("messages")
    @classmethod
    def _a_user_message(cls, messages: list) -> list:
        if not any(isinstance(m, UserMessage) for m in messages):
            raise PydanticCustomError("invalid", "messages must contain at least one user message.")
        return messages


Id = Annotated[uuid.UUID, Strict(False)]  # a UUID string


class DeniedTool(_Shape):
    tool_execution_id: Id
    reason: str | None = None


class EditedToolExecution(_Shape):
    tool_execution_id: Id
    arguments: Annotated[
        str,
        Field(
            max_length=65536,
            description="The arguments to run instead of the model's: the JSON text of an object that passes the"
            " tool's schema and is not denied by its approval rules. An edit approves the call.",
        ),
    ]


class ChatResume(ChatParameters):
    """Continue a run paused for approval: decide its tool calls (here or on the approver page) and let the
    group go on. Every call needing a decision needs one; `model` must name the approval's group."""

    approval_id: Annotated[Id, Field(description="`kitemesh.approval_id` of the paused answer.")]
    approved_tool_execution_ids: list[Id] | None = None
    denied_tools: list[DeniedTool] | None = None
    edited_tool_executions: list[EditedToolExecution] | None = None
    messages: Annotated[list[Message], Field(description="Optional; appended after the tool results.")] | None = None


# --- What the engine reads --------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    """A validated chat completions (or resume) body, as the engine reads it."""

    group_id: uuid.UUID
    messages: list[dict]  # as the client sent them
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    mode: str | None = None
    request_id: str | None = None
    metadata: dict = field(default_factory=dict)  # the client's, but request_id and mode
    include_usage: bool = False
    passthrough: dict = field(default_factory=dict)
    body_hash: str = ""

    @property
    def model(self) -> str:
        return f"group:{self.group_id}"

    def upstream_params(self) -> dict:
        params = dict(self.passthrough)
        if self.temperature is not None:
            params["temperature"] = self.temperature
        return params


@dataclass
class ResumeRequest:
    chat: ChatRequest
    approval_id: uuid.UUID
    approved: set[uuid.UUID]
    denied: dict[uuid.UUID, str]  # tool execution id → reason
    edited: dict[uuid.UUID, str]  # tool execution id → the arguments to run, in the body's order


def chat_request_parse(body: dict) -> ChatRequest:
    """Validate a completions body (a 400 naming the field at fault)."""
    return _chat_request(body, _validated(CreateChatCompletion, body))


def resume_request_parse(body: dict) -> ResumeRequest:
    """Validate a resume body: the completions fields plus the approval and the API's decisions."""
    resume = _validated(ChatResume, body)
    return ResumeRequest(
        chat=_chat_request(body, resume),
        approval_id=resume.approval_id,
        approved=set(resume.approved_tool_execution_ids or ()),
        denied={d.tool_execution_id: d.reason or "" for d in resume.denied_tools or ()},
        edited=_edits(resume.edited_tool_executions or []),
    )


def _edits(edits: list[EditedToolExecution]) -> dict[uuid.UUID, str]:
    """The edits by call, each a JSON object (its schema and rules are checked with its tool, at the claim)."""
    found: dict[uuid.UUID, str] = {}
    for index, edit in enumerate(edits):
        if edit.tool_execution_id in found:
            raise InvalidRequest(
                f"Tool execution {edit.tool_execution_id} is edited twice.", param="edited_tool_executions"
            )
        try:
            value = json.loads(edit.arguments)
        except ValueError as exc:
            raise edit_invalid(f"are not valid JSON ({exc})", param=edit_param(index)) from None
        if not isinstance(value, dict):
            raise edit_invalid("must be a JSON object", param=edit_param(index))
        found[edit.tool_execution_id] = edit.arguments
    return found


def _chat_request(body: dict, wire: ChatParameters) -> ChatRequest:
    metadata = wire.metadata or Metadata()
    return ChatRequest(
        group_id=uuid.UUID(wire.model.removeprefix("group:")),
        messages=body.get("messages") or [],
        stream=bool(wire.stream),
        max_tokens=wire.max_completion_tokens or wire.max_tokens,
        temperature=wire.temperature,
        mode=metadata.mode,
        request_id=metadata.request_id,
        metadata={k: v for k, v in body["metadata"].items() if k not in ("request_id", "mode")}
        if wire.metadata
        else {},
        include_usage=bool(wire.stream_options and wire.stream_options.include_usage),
        passthrough={name: body[name] for name in PASSTHROUGH_FIELDS if body.get(name) is not None},
        # Only an idempotency key needs the body's fingerprint: skip the extra JSON pass otherwise.
        body_hash=_fingerprint(body) if metadata.request_id is not None else "",
    )


def _fingerprint(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _validated(shape: type[ChatParameters], body: dict) -> Any:
    try:
        return shape.model_validate(body)
    except ValidationError as error:
        raise _invalid(error, body) from None


# --- A validation error as the SPEC's 400 ------------------------------------------------------------------


def _invalid(error: ValidationError, body: dict) -> InvalidRequest:
    """The first violation, as a 400 naming its field. Where the value could have been of several types (a
    content: a string or a list of parts), the alternative that got deepest into it names the place."""
    places = [_place(detail, body) for detail in error.errors(include_url=False)]
    first_path, branch, _ = places[0]
    path, _, detail = max(
        (p for p in places if p[0][:branch] == first_path[:branch]), key=lambda p: len(p[0]), default=places[0]
    )
    param = ".".join(map(str, path)) or None
    if detail["type"] in ("invalid", "value_error"):
        message = detail["msg"].removeprefix("Value error, ")
    elif detail["type"] == "missing":
        message = f"{param} is required."
    elif detail["type"].startswith("union_tag"):
        message = "role must be one of system, developer, user, assistant, tool."
    else:
        message = f"{param}: {detail['msg']}."
    return InvalidRequest(message, param=param)


def _place(detail: dict, body: dict) -> tuple[list, int, dict]:
    """(The path of `detail` in the body, how much of it precedes its last choice between types, the detail).
    Pydantic's location also names the type tried at each choice (`user`, `str`): the path keeps only the keys
    and indexes the body has, and a missing field's name."""
    path, branch, value = [], None, body
    loc = detail["loc"]
    for i, step in enumerate(loc):
        if _has(value, step):
            value = value[step]
        elif not (i == len(loc) - 1 and detail["type"] == "missing"):
            branch = len(path)  # a type's tag
            continue
        path.append(step)
    if detail["type"].startswith("union_tag"):  # no role, or one no message has
        path.append("role")
    return path, len(path) if branch is None else branch, detail


def _has(value: Any, step: str | int) -> bool:
    """Whether `step` is a key or an index of `value` (a message's role names its type: a tag, not a place)."""
    if isinstance(value, dict):
        return step in value and step != value.get("role")
    return isinstance(value, list) and isinstance(step, int) and step < len(value)
