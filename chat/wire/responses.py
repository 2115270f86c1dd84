"""The API's answers: built here as plain dicts (a completion's is on the hot path: no model to construct),
and described by the pydantic models below for the OpenAPI document (chat.openapi). tests/site/test_openapi.py
holds live answers against that document, so a field added to one and not the other fails there."""

import datetime
import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from billing.token_limits import TokenSpend
from chat.wire.requests import ToolCall
from core.models import ApiToken, Mode, Step, Tool, ToolExecution
from core.models import Approval as ApprovalRow
from core.models import Execution as ExecutionRow
from core.timestamps import iso

# The mode a request actually ran in: `auto` is resolved before anything runs, so it is never reported.
RunMode = Literal[Mode.NORMAL.value, Mode.SYNTHESIS.value, Mode.ORCHESTRATION.value]
ErrorType = Literal[
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


# --- Builders ------------------------------------------------------------------------------------------------


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    *, completion_id: str, created: int, model: str, message: dict, finish_reason: str, usage: dict, kitemesh: dict
) -> dict:
    """A ChatCompletion."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": usage,
        "kitemesh": kitemesh,
    }


def chunk_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    delta: dict | None = None,
    finish_reason: str | None = None,
    usage: dict | None = None,
    kitemesh: dict | None = None,
) -> dict:
    """A ChatCompletionChunk; with `usage` and no delta it is the include_usage chunk (empty choices)."""
    chunk: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    if delta is None and usage is not None:
        chunk["choices"] = []
    else:
        chunk["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}]
    if usage is not None:
        chunk["usage"] = usage
    if kitemesh is not None:
        chunk["kitemesh"] = kitemesh
    return chunk


def sse_event(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse_event("[DONE]")


def execution_body(execution: ExecutionRow) -> dict:
    """An Execution (its steps and approvals prefetched)."""
    steps = [
        {
            "kind": s.kind,
            **(_tool_step(s) if s.kind == "tool_call" else {"model": s.model_name, "agent": s.agent or None}),
            "status": s.status,
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "usage_estimated": s.usage_estimated,
            "latency_ms": s.latency_ms,
            "error": s.error or None,
        }
        for s in execution.steps.all()
    ]
    return {
        "object": "execution",
        "id": str(execution.id),
        "status": execution.status,
        "model": f"group:{execution.group_id}" if execution.group_id else None,
        "group": execution.group.name if execution.group else None,
        "mode": execution.mode,
        "request_id": execution.request_id,
        "created_at": iso(execution.created_at),
        "finished_at": iso(execution.finished_at),
        "usage": usage_body(execution.prompt_tokens, execution.completion_tokens),
        "credits_charged": execution.credits_charged,
        "error": {k: execution.error[k] for k in ("type", "code", "message")} if execution.error else None,
        "steps": steps,
        "approvals": [{"id": str(a.id), "status": a.status} for a in execution.approvals.all()],
    }


def _tool_step(step: Step) -> dict:
    """A tool call's step: the tool, and who decided the call (a rule, a person, a token, or no one)."""
    te = step.tool_execution
    return {
        "tool": step.model_name,
        "decided_via": (te.decided_via or None) if te else None,
        "decided_by": (te.decided_by or None) if te else None,
    }


def token_credits_body(spend: TokenSpend) -> dict:
    return {
        "name": spend.name,
        "credit_limit": spend.credit_limit,
        "credit_period": spend.credit_period,
        "spent": spend.spent,
        "held": spend.held,
        "resets_at": iso(spend.resets_at),
    }


# --- What the answers are, for the OpenAPI document -------------------------------------------------------------


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


NonNegative = Annotated[int, Field(ge=0)]
_DECIDED_VIA = (
    "`auto` (needed no approval), `api` (POST /v1/chat/resume), `ui` (the approver page) or `rule` (one of the"
    " tool's approval rules)."
)


class Usage(_Answer):
    """Tokens of every model call of the request (all agents and the brain)."""

    prompt_tokens: NonNegative
    completion_tokens: NonNegative
    total_tokens: NonNegative


class KitemeshInfo(_Answer):
    """What KiteMesh adds to an answer. `approval_id` and `expires_at` are present when the run paused for
    approval."""

    execution_id: uuid.UUID
    request_id: str
    mode: Annotated[RunMode, Field(description="The mode the request ran in.")]
    credits_charged: Annotated[NonNegative, Field(description="This request's charge.")]
    approval_id: uuid.UUID | None = None
    expires_at: Annotated[datetime.datetime, Field(description="When the approval expires (UTC).")] | None = None


class AnswerToolCall(ToolCall):
    model_config = ConfigDict(extra="forbid")


class AssistantAnswer(_Answer):
    role: Literal["assistant"]
    content: Annotated[str | None, Field(description="null when the run paused.")]
    tool_calls: (
        Annotated[list[AnswerToolCall], Field(description="On a pause: the calls that need a decision.")] | None
    ) = None


class ChatCompletionChoice(_Answer):
    index: NonNegative
    message: AssistantAnswer
    finish_reason: Annotated[
        str, Field(description="`stop`, `length`, … as the brain model said; `tool_calls` on a pause.")
    ]


class ChatCompletion(_Answer):
    """A chat completion: the group's answer, or a pause for approval (`finish_reason` `tool_calls`,
    `message.content` null, `kitemesh.approval_id`)."""

    id: str
    object: Literal["chat.completion"]
    created: Annotated[int, Field(description="Unix time.")]
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    kitemesh: KitemeshInfo


class Progress(_Answer):
    """An agent's (`agent`: started, done, failed) or a tool call's (`tool`: running, succeeded, failed,
    denied)."""

    agent: str | None = None
    tool: str | None = None
    status: Literal["started", "done", "failed", "running", "succeeded", "denied"]


class KitemeshChunkInfo(KitemeshInfo):
    """KiteMesh's part of a chunk: on the last chunk (with `credits_charged`), on the approval chunk, and on
    progress chunks of agents and tool calls (`progress`, with an empty delta)."""

    credits_charged: NonNegative | None = None
    progress: Progress | None = None


class ChunkToolCall(AnswerToolCall):
    index: NonNegative


class ChunkDelta(_Answer):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: (
        Annotated[
            list[ChunkToolCall], Field(description="The approval chunk: every call needing a decision, complete.")
        ]
        | None
    ) = None


class ChunkChoice(_Answer):
    index: NonNegative
    delta: ChunkDelta
    finish_reason: str | None


class ChatCompletionChunk(_Answer):
    """One `data:` event of a stream. The include_usage chunk has `usage` and empty `choices`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    kitemesh: KitemeshChunkInfo | None = None


class Model(_Answer):
    id: Annotated[str, Field(description="`group:<uuid>`, the `model` of a completion request.")]
    object: Literal["model"]
    owned_by: Annotated[str, Field(description="The team's name.")]
    name: Annotated[str, Field(description="The group's name.")]


class ModelList(_Answer):
    """The groups this token may use."""

    object: Literal["list"]
    data: list[Model]


class TokenCredits(_Answer):
    """The calling token's use of its credit limit (SPEC §6); without a limit, the limit fields are null and
    `spent` counts every charge of its runs."""

    name: str
    credit_limit: NonNegative | None
    credit_period: Literal[tuple(ApiToken.CreditPeriod.values)] | None
    spent: Annotated[int, Field(ge=0, description="Charged to the token's runs in the current period.")]
    held: Annotated[int, Field(ge=0, description="Held by the token's runs in flight.")]
    resets_at: Annotated[datetime.datetime | None, Field(description="When the period starts again (UTC).")]


class CreditBalance(_Answer):
    """The token's team's credits: `balance`, of which `held` is reserved by requests in flight; and the
    token's own use of its credit limit."""

    object: Literal["credit_balance"]
    team: str
    balance: NonNegative
    held: NonNegative
    token: TokenCredits


class ApprovalToolExecution(_Answer):
    """A tool call of the approval, as an approver sees it. `method`, `host` and `path` are null when the tool
    has been deleted since."""

    id: Annotated[uuid.UUID, Field(description="The tool execution id, to approve or deny.")]
    tool: str
    method: Literal[tuple(Tool.Method.values)] | None
    host: str | None
    path: str | None
    arguments: Annotated[Any, Field(description="The arguments that run or ran, as JSON, with secret values redacted.")]
    edited: Annotated[bool, Field(description="An approver changed the arguments (SPEC §6, Edit, then approve).")]
    original_arguments: Annotated[
        Any, Field(description="The model's arguments, redacted, when the call was edited; else null.")
    ]
    risk: Literal[tuple(Tool.Risk.values)]
    requires_approval: bool
    approvals_required: Annotated[
        int, Field(ge=1, description="Different people who must approve it on the approver page (SPEC §6).")
    ]
    approved_by: Annotated[
        list[str], Field(description="Who approved it so far, when it needs several people; else empty.")
    ]
    status: Literal[tuple(ToolExecution.Status.values)]
    decision: Literal["approved", "denied"] | None
    reason: str
    decided_by: Annotated[str | None, Field(description="A user name, `token:<name>`, or the approval rule's name.")]
    decided_via: Annotated[Literal[tuple(ToolExecution.DecidedVia.values)] | None, Field(description=_DECIDED_VIA)]
    decided_at: datetime.datetime | None


class Approval(_Answer):
    """A round of tool calls paused for decisions. Reading it also applies its expiry."""

    object: Literal["approval"]
    id: uuid.UUID
    status: Literal[tuple(ApprovalRow.Status.values)]
    execution_id: uuid.UUID
    model: str
    created_at: datetime.datetime
    expires_at: datetime.datetime
    tool_executions: list[ApprovalToolExecution]


class _Step(_Answer):
    status: Literal[tuple(Step.Status.values)]
    prompt_tokens: NonNegative
    completion_tokens: NonNegative
    usage_estimated: Annotated[bool, Field(description="The upstream reported no usage: ceil(characters / 4).")]
    latency_ms: NonNegative
    error: str | None


class ModelCallStep(_Step):
    """A call of the brain or an agent."""

    kind: Literal["model_call"]
    model: str
    agent: Annotated[str | None, Field(description="The agent's name; null for the brain.")]


class ToolCallStep(_Step):
    """A tool call: run, or `denied` (by a person, a token or an approval rule) and never sent."""

    kind: Literal["tool_call"]
    tool: str
    decided_via: Annotated[Literal[tuple(ToolExecution.DecidedVia.values)] | None, Field(description=_DECIDED_VIA)]
    decided_by: Annotated[str | None, Field(description="A user name, `token:<name>`, or the approval rule's name.")]


class ExecutionApproval(_Answer):
    id: uuid.UUID
    status: Literal[tuple(ApprovalRow.Status.values)]


class ExecutionError(_Answer):
    type: ErrorType
    code: str
    message: str


class Execution(_Answer):
    """A run through a group (a completion and its resumes): every model call and tool run as a step, usage
    and credits in total."""

    object: Literal["execution"]
    id: uuid.UUID
    status: Literal[tuple(ExecutionRow.Status.values)]
    model: Annotated[str | None, Field(description="null when the group has been deleted since.")]
    group: Annotated[str | None, Field(description="The group's name.")]
    mode: RunMode
    request_id: str
    created_at: datetime.datetime
    finished_at: datetime.datetime | None
    usage: Usage
    credits_charged: NonNegative
    error: Annotated[
        ExecutionError | None,
        Field(
            description="Why a failed run failed: for example `upstream_error`, or `run_interrupted` when the "
            "process running it stopped (what it completed was charged)."
        ),
    ]
    steps: list[Annotated[ModelCallStep | ToolCallStep, Field(discriminator="kind")]]
    approvals: list[ExecutionApproval]


class ErrorDetail(_Answer):
    message: str
    type: ErrorType
    code: Annotated[str, Field(description="For example `model_not_found`, `decision_required`, `upstream_timeout`.")]
    param: (
        Annotated[str, Field(description="The field at fault, dotted (`messages.2.content`); only on field errors.")]
        | None
    ) = None
    request_id: Annotated[str, Field(description="The same id as the `X-Request-ID` header.")]


class Error(_Answer):
    """Every API error, whatever its status."""

    error: ErrorDetail
