"""A run's events as the client receives them: one JSON body (run_complete) or server-sent events
(run_stream) for the API, and an earlier result sent again for a repeated request_id (replay_stream). Every
renderer (the chat pages' too: chat.services.turns) reads the run through run_relay, which renews its lease
while it works and settles it whichever way it ends."""

import asyncio
from collections.abc import AsyncIterator

from chat.engine.modes.normal import run_events
from chat.engine.run import Answer, Answered, Pause, Progress, Run, lease_renewals
from chat.wire.responses import SSE_DONE, chunk_body, sse_event
from core.envelope import error_body
from core.errors import KiteMeshError
from core.models import Execution


async def run_relay(run: Run) -> AsyncIterator[str | Progress | Answered | Pause]:
    """The run's text deltas and progress as they come, then its answer (settled) or its pause, last. The
    run's lease is renewed while it works. Whichever way it stops it is settled once, and a KiteMeshError
    raised (the client leaving is raised as it came)."""
    events = run_events(run)
    renewals = asyncio.ensure_future(lease_renewals(run.execution))
    last: Answered | Pause | None = None
    try:
        async for event in events:
            if isinstance(event, Answer):
                body = run.body({"role": "assistant", "content": event.reply.content}, event.reply.finish_reason)
                await run.finish(Execution.Status.SUCCEEDED, response=body)
                last = Answered(event.reply, body)
                break
            if isinstance(event, Pause):
                last = event
                break
            yield event
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            # Closed at a yield (not cancelled mid-await), the inner loop is suspended: stop its agents
            # and calls now so their steps are recorded before the run settles.
            await events.aclose()
        error = await run.stopped(exc)
        if error is None or error is exc:
            raise
        raise error from exc
    finally:
        renewals.cancel()
    if last is None:
        raise AssertionError("run_events ends with an answer or a pause")
    yield last


async def run_complete(run: Run) -> dict:
    """Answer a request with one JSON body: the final answer, or the approval pause."""
    async for event in run_relay(run):
        if isinstance(event, Answered):
            return event.body
        if isinstance(event, Pause):
            return event.response
    raise AssertionError("run_relay ends with an answer or a pause")


async def run_stream(run: Run) -> AsyncIterator[bytes]:
    """Relay the run as SSE, text as the brain produces it. An error before the first event is raised
    (the view answers it with its HTTP status); after that it is one error event, then [DONE]."""
    chunk = {"completion_id": run.completion_id, "created": run.created, "model": run.request.model}
    sent = False
    relay = run_relay(run)
    try:
        async for event in relay:
            if not sent:
                sent = True
                yield sse_event(chunk_body(**chunk, delta={"role": "assistant", "content": ""}))
            if isinstance(event, str):
                yield sse_event(chunk_body(**chunk, delta={"content": event}))
            elif isinstance(event, Progress):
                progress = {**run.kitemesh(), "progress": event.body()}
                yield sse_event(chunk_body(**chunk, delta={}, kitemesh=progress))
            else:
                for last in _last_events(run, event, chunk):
                    yield last
    except KiteMeshError as error:
        if not sent:
            raise
        yield sse_event(error_body(error, run.request_id))
        yield SSE_DONE
    finally:
        await relay.aclose()  # closed at a yield (the client left): the relay settles the run


def _last_events(run: Run, event: Answered | Pause, chunk: dict) -> list[bytes]:
    """A stream's end: the finish chunk (the answer's, or the pause's tool calls), the usage when asked
    for, [DONE]."""
    if isinstance(event, Answered):
        finish_reason, delta, kitemesh = event.reply.finish_reason, {}, event.body["kitemesh"]
    else:
        tool_calls = event.response["choices"][0]["message"]["tool_calls"]
        finish_reason, delta = "tool_calls", {"tool_calls": _delta_tool_calls(tool_calls)}
        kitemesh = event.response["kitemesh"]
    last = [sse_event(chunk_body(**chunk, delta=delta, finish_reason=finish_reason, kitemesh=kitemesh))]
    if run.request.include_usage:
        last.append(sse_event(chunk_body(**chunk, usage=run.usage())))
    return [*last, SSE_DONE]


def _delta_tool_calls(tool_calls: list[dict]) -> list[dict]:
    return [{"index": i, **call} for i, call in enumerate(tool_calls)]


async def replay_stream(body: dict, include_usage: bool) -> AsyncIterator[bytes]:
    """An earlier result sent again as a stream, for a repeated request_id."""
    chunk = {"completion_id": body["id"], "created": body["created"], "model": body["model"]}
    choice = body["choices"][0]
    message = choice["message"]
    yield sse_event(chunk_body(**chunk, delta={"role": "assistant", "content": ""}))
    if message.get("content"):
        yield sse_event(chunk_body(**chunk, delta={"content": message["content"]}))
    delta = {"tool_calls": _delta_tool_calls(message["tool_calls"])} if message.get("tool_calls") else {}
    yield sse_event(chunk_body(**chunk, delta=delta, finish_reason=choice["finish_reason"], kitemesh=body["kitemesh"]))
    if include_usage:
        yield sse_event(chunk_body(**chunk, usage=body["usage"]))
    yield SSE_DONE
