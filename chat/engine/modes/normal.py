"""`normal`, the loop every mode runs: the brain answers, or asks for tools; their round runs (or pauses
for approval) and the brain is asked again, up to MAX_TOOL_ROUNDS rounds in a row. A resumed run starts
with its decided round; synthesis first has its agents answer."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from billing.pricing import call_worst_case
from chat.engine.modes.synthesis import synthesis_run
from chat.engine.providers import ModelEndpoint, ModelReply, Usage, provider_for
from chat.engine.rounds import pause, round_record, tool_specs, tools_run
from chat.engine.run import Answer, Pause, Progress, Run, partial_usage
from chat.metrics import upstream_error_count
from core.errors import KiteMeshError, UpstreamError
from core.models import Mode, Step
from core.sql import sql_insert

MAX_TOOL_ROUNDS = 8  # brain calls that ask for tools, in a row, before the run is stopped


async def run_events(run: Run) -> AsyncIterator[str | Progress | Answer | Pause]:
    """The loop: [the resumed round, or the agents] → brain → tool calls → tools and delegations (or a
    pause for approval) → brain, until it answers. Text deltas (streaming) and progress as they come."""
    if run.resumed_round:
        async for progress in tools_run(run, run.resumed_round):
            yield progress
        run.messages.extend(run.request.messages)
    elif run.mode == Mode.SYNTHESIS:
        async for progress in synthesis_run(run):
            yield progress
    for rounds in range(MAX_TOOL_ROUNDS + 1):
        reply = None
        async for item in brain_call(run):
            if isinstance(item, ModelReply):
                reply = item
            else:
                yield item
        if not reply.tool_calls:
            yield Answer(reply)
            return
        if rounds == MAX_TOOL_ROUNDS:
            break  # before recording or running anything of a round that would not reach the brain
        calls = round_record(run, reply)
        if any(c.requires_approval for c in calls):
            yield await pause(run, calls)
            return
        await run.db(sql_insert, objs=calls)
        async for progress in tools_run(run, calls):
            yield progress
    raise UpstreamError(
        f"The brain asked for tools {MAX_TOOL_ROUNDS} rounds in a row; the run was stopped.",
        code="tool_rounds_exceeded",
    )


async def brain_call(run: Run) -> AsyncIterator[str | ModelReply]:
    """One brain call, reserved first and recorded as a step whatever happens: text deltas (when
    streaming), then the reply. When the brain's upstream fails before producing anything, its fallbacks
    answer in turn."""
    specs = tool_specs(run.tools.values(), run.mode, run.agents)
    params = {**run.params, "tools": specs} if specs else run.params
    max_tokens = run.params["max_tokens"]
    await run.reserve(max(call_worst_case(model, run.messages, specs, max_tokens) for model, _ in run.brains))
    for attempt, (model, endpoint) in enumerate(run.brains):
        started, produced = time.monotonic(), []
        try:
            async with contextlib.aclosing(_reply(run, endpoint, params)) as items:  # a client that leaves stops it
                async for item in items:
                    if isinstance(item, ModelReply):
                        reply = item
                    else:
                        produced.append(item)
                        yield item
        except KiteMeshError as error:
            upstream_error_count(group=str(run.group.id), code=error.code)
            used = partial_usage(run.messages, "".join(produced)) if produced else Usage()
            run.step_model(model, "", used, started, Step.Status.FAILED, error.message)
            if produced or attempt == len(run.brains) - 1:
                raise
            continue  # nothing reached the client: the next fallback answers
        except (asyncio.CancelledError, GeneratorExit):
            used = partial_usage(run.messages, "".join(produced))
            run.step_model(model, "", used, started, Step.Status.CANCELLED, "client disconnected")
            raise
        run.step_model(model, "", reply.usage, started, Step.Status.SUCCEEDED)
        yield reply
        return


async def _reply(run: Run, endpoint: ModelEndpoint, params: dict) -> AsyncIterator[str | ModelReply]:
    """The brain's text deltas then its reply (streaming), or its reply alone."""
    provider = provider_for(endpoint)
    if run.request.stream:
        async for item in provider.stream(endpoint, run.messages, params):
            yield item
    else:
        yield await provider.complete(endpoint, run.messages, params)
