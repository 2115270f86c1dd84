"""The run of one request through a group: resolve the mode, hold credits, call the brain (answer or
stream), record every model call as a step, settle. Database work crosses to the sync layer once per
transaction; nothing here blocks the event loop."""

import asyncio
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal

from asgiref.sync import sync_to_async
from django.conf import settings

from billing.models import Hold
from chat.engine.providers import ModelEndpoint, ModelReply, Usage, prompt_length, provider_for, tokens_estimate
from chat.errors import ApiError, InvalidRequest, api_error_restore
from chat.models import ApiToken, CustomModel, Execution, Group, Mode, Step
from chat.selectors import model_endpoint_get
from chat.services.executions import execution_finish, execution_start
from chat.wire import SSE_DONE, ChatRequest, chunk_body, completion_body, error_body, sse_event, usage_body

AVAILABLE_MODES = {Mode.NORMAL}


def mode_resolve(group: Group, requested: str | None) -> str:
    """`auto` picks normal while normal is the only mode this gateway runs (synthesis and
    orchestration come with their own issue)."""
    mode = requested or group.mode
    if mode == Mode.AUTO:
        return Mode.NORMAL
    if mode not in AVAILABLE_MODES:
        raise InvalidRequest(f"Mode {mode!r} is not available yet; use normal or auto.", param="metadata.mode")
    return mode


def model_cost(model: CustomModel, usage: Usage) -> Decimal:
    return (usage.prompt_tokens * model.input_per_1k + usage.completion_tokens * model.output_per_1k) / 1000


def hold_amount_for(model: CustomModel, messages: list[dict], max_tokens: int) -> int:
    """The worst case of one brain call: the prompt as estimated plus every allowed output token."""
    return math.ceil(model_cost(model, Usage(tokens_estimate(prompt_length(messages)), max_tokens)))


@dataclass
class Run:
    execution: Execution
    hold: Hold | None
    group: Group
    request: ChatRequest
    endpoint: ModelEndpoint
    messages: list[dict]
    params: dict
    steps: list[Step] = field(default_factory=list)
    completion_id: str = field(default_factory=lambda: "chatcmpl_" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def request_id(self) -> str:
        return self.execution.request_id

    def kitemesh(self, credits_charged: int | None = None) -> dict:
        body = {"execution_id": str(self.execution.id), "request_id": self.request_id}
        if credits_charged is not None:
            body["credits_charged"] = credits_charged
        return body

    def step_record(self, model: CustomModel, usage: Usage, started: float, status: str, error: str = "") -> None:
        self.steps.append(
            Step(
                execution=self.execution,
                kind=Step.Kind.MODEL_CALL,
                custom_model=model,
                model_name=model.model,
                status=status,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                usage_estimated=usage.estimated,
                cost=model_cost(model, usage),
                latency_ms=int((time.monotonic() - started) * 1000),
                error=error[:500],
            )
        )

    def usage(self) -> dict:
        return usage_body(sum(s.prompt_tokens for s in self.steps), sum(s.completion_tokens for s in self.steps))

    async def finish(self, status: str, *, response: dict | None = None, error: ApiError | None = None) -> int:
        # Shielded: a client that disconnects must not cancel the settlement of what it used.
        return await asyncio.shield(
            sync_to_async(execution_finish)(
                execution=self.execution,
                hold=self.hold,
                steps=self.steps,
                status=status,
                response=response,
                error=error,
            )
        )

    def partial_usage(self, produced: str) -> Usage:
        """What a call cut short has used, estimated (the upstream reports usage only at the end).
        A call that failed before producing anything is not charged; see README, Billing."""
        return Usage(tokens_estimate(prompt_length(self.messages)), tokens_estimate(len(produced)), estimated=True)


@dataclass
class Replay:
    """An earlier execution with the same request_id and body: its result is answered again."""

    execution: Execution

    def body(self) -> dict:
        if self.execution.response is None:
            raise api_error_restore(self.execution.error)
        return self.execution.response


async def run_start(*, token: ApiToken, group: Group, request: ChatRequest, request_id: str) -> Run | Replay:
    mode = mode_resolve(group, request.mode)
    brain = group.brain
    messages = ([{"role": "system", "content": brain.system}] if brain.system else []) + request.messages
    max_tokens = request.max_tokens or group.max_output_tokens or settings.KITEMESH_DEFAULT_MAX_OUTPUT_TOKENS
    start = await sync_to_async(execution_start)(
        token=token,
        group=group,
        mode=mode,
        request_id=request_id,
        client_request_id=request.request_id is not None,
        body_hash=request.body_hash,
        stream=request.stream,
        metadata=request.metadata,
        hold_amount=hold_amount_for(brain, messages, max_tokens),
    )
    if start.replayed:
        return Replay(start.execution)
    return Run(
        execution=start.execution,
        hold=start.hold,
        group=group,
        request=request,
        endpoint=model_endpoint_get(brain),
        messages=messages,
        params={**request.upstream_params(), "max_tokens": max_tokens},
    )


def _message(reply: ModelReply) -> dict:
    message: dict = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    return message


async def run_complete(run: Run) -> dict:
    """Answer a non-stream request."""
    brain, started = run.group.brain, time.monotonic()
    try:
        reply = await provider_for(run.endpoint).complete(run.endpoint, run.messages, run.params)
    except ApiError as error:
        run.step_record(brain, Usage(), started, Step.Status.FAILED, error.message)
        await run.finish(Execution.Status.FAILED, error=error)
        raise
    except asyncio.CancelledError:
        run.step_record(brain, run.partial_usage(""), started, Step.Status.CANCELLED, "client disconnected")
        await run.finish(Execution.Status.CANCELLED)
        raise
    run.step_record(brain, reply.usage, started, Step.Status.SUCCEEDED)
    body = completion_body(
        completion_id=run.completion_id,
        created=run.created,
        model=run.request.model,
        message=_message(reply),
        finish_reason=reply.finish_reason,
        usage=run.usage(),
        kitemesh=run.kitemesh(credits_charged=0),
    )
    await run.finish(Execution.Status.SUCCEEDED, response=body)
    return body


async def run_stream(run: Run) -> AsyncIterator[bytes]:
    """Relay the brain's stream chunk by chunk. An error before the first chunk is raised (the view
    answers it with its HTTP status); after that it is sent as one error event, then [DONE]."""
    brain, started = run.group.brain, time.monotonic()
    chunk = {"completion_id": run.completion_id, "created": run.created, "model": run.request.model}
    produced: list[str] = []
    reply: ModelReply | None = None
    try:
        async for item in provider_for(run.endpoint).stream(run.endpoint, run.messages, run.params):
            if isinstance(item, ModelReply):
                reply = item
                continue
            if not produced:
                yield sse_event(chunk_body(**chunk, delta={"role": "assistant", "content": ""}))
            produced.append(item)
            yield sse_event(chunk_body(**chunk, delta={"content": item}))
    except ApiError as error:
        used = run.partial_usage("".join(produced)) if produced else Usage()
        run.step_record(brain, used, started, Step.Status.FAILED, error.message)
        await run.finish(Execution.Status.FAILED, error=error)
        if not produced:
            raise
        yield sse_event(error_body(error, run.request_id))
        yield SSE_DONE
        return
    except (asyncio.CancelledError, GeneratorExit):
        run.step_record(
            brain, run.partial_usage("".join(produced)), started, Step.Status.CANCELLED, "client disconnected"
        )
        await run.finish(Execution.Status.CANCELLED)
        raise
    assert reply is not None, "a provider stream ends with its ModelReply"
    run.step_record(brain, reply.usage, started, Step.Status.SUCCEEDED)
    if not produced:
        yield sse_event(chunk_body(**chunk, delta={"role": "assistant", "content": ""}))
    final = completion_body(
        completion_id=run.completion_id,
        created=run.created,
        model=run.request.model,
        message=_message(reply),
        finish_reason=reply.finish_reason,
        usage=run.usage(),
        kitemesh=run.kitemesh(credits_charged=0),
    )
    charged = await run.finish(Execution.Status.SUCCEEDED, response=final)
    yield sse_event(chunk_body(**chunk, delta={}, finish_reason=reply.finish_reason, kitemesh=run.kitemesh(charged)))
    if run.request.include_usage:
        yield sse_event(chunk_body(**chunk, usage=run.usage()))
    yield SSE_DONE


async def replay_stream(body: dict, include_usage: bool) -> AsyncIterator[bytes]:
    """An earlier result sent again as a stream, for a repeated request_id."""
    chunk = {"completion_id": body["id"], "created": body["created"], "model": body["model"]}
    choice = body["choices"][0]
    yield sse_event(chunk_body(**chunk, delta={"role": "assistant", "content": ""}))
    if choice["message"].get("content"):
        yield sse_event(chunk_body(**chunk, delta={"content": choice["message"]["content"]}))
    yield sse_event(chunk_body(**chunk, delta={}, finish_reason=choice["finish_reason"], kitemesh=body["kitemesh"]))
    if include_usage:
        yield sse_event(chunk_body(**chunk, usage=body["usage"]))
    yield SSE_DONE
