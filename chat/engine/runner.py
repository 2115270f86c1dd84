"""The run of one request through a group: resolve the mode, hold credits, run the agents (synthesis)
or offer them as a delegate tool (orchestration), call the brain, run its tool calls round by round
(pausing for approval when a tool needs it), record every model call and tool run as a step, settle.
`run_events` is the one loop; `run_complete` and `run_stream` render its events as JSON or SSE.
Database work crosses to the sync layer once per transaction."""

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from django.conf import settings

from approvals.services import ResumeClaim, approval_pause
from billing.models import Hold
from billing.services.ledger import hold_reserve
from chat.engine.modes import (
    AGENT_CONCURRENCY,
    DELEGATE_TOOL,
    Agent,
    agent_messages,
    delegate_arguments,
    delegate_spec,
    mode_resolve,
    synthesis_note,
    task_messages,
)
from chat.engine.providers import ModelEndpoint, ModelReply, Usage, prompt_length, provider_for, tokens_estimate
from chat.engine.tools import (
    ToolArgumentsInvalid,
    ToolResult,
    tool_arguments_parse,
    tool_call_run,
    tool_risk,
    tool_spec,
)
from chat.errors import ApiError, InternalError, UpstreamError
from chat.selectors import model_endpoint_get
from chat.services.executions import (
    ExecutionStart,
    execution_finish,
    execution_lease_renew,
    execution_start,
    steps_write,
    tool_execution_finish,
    tool_execution_start,
)
from chat.wire import SSE_DONE, ChatRequest, chunk_body, completion_body, error_body, random_hex, sse_event
from core.models import ApiToken, Approval, CustomModel, Execution, Group, GroupAgent, Mode, Step, Tool, ToolExecution
from kitemesh_site.db import db_future, in_db_thread
from kitemesh_site.metrics import tool_run_count, upstream_call_observe, upstream_error_count

MAX_TOOL_ROUNDS = 8  # brain calls that ask for tools, in a row, before the run is stopped
_CALL_ID_LENGTH = ToolExecution._meta.get_field("call_id").max_length
_TOOL_NAME_LENGTH = ToolExecution._meta.get_field("tool_name").max_length

logger = logging.getLogger(__name__)
T = TypeVar("T")


def model_cost(model: CustomModel, usage: Usage) -> Decimal:
    return (usage.prompt_tokens * model.input_per_1k + usage.completion_tokens * model.output_per_1k) / 1000


def call_worst_case(model: CustomModel, messages: list[dict], tools: list[dict], max_tokens: int) -> int:
    """The most one model call can cost: its prompt (and tool specs) as estimated, plus every allowed
    output token."""
    prompt = tokens_estimate(prompt_length(messages) + (len(json.dumps(tools)) if tools else 0))
    return math.ceil(model_cost(model, Usage(prompt, max_tokens)))


def tools_price(tools: list[Tool | None]) -> int:
    return math.ceil(sum((t.price for t in tools if t is not None), Decimal(0)))


def arguments_hash(arguments: str) -> str:
    return hashlib.sha256(arguments.encode()).hexdigest()


@dataclass
class Answer:
    reply: ModelReply


@dataclass
class Pause:
    approval: Approval
    response: dict  # the pause answer, with its kitemesh approval_id, expires_at and credits_charged


@dataclass
class Progress:
    """An agent started, finished or failed (SSE shows it as `kitemesh.progress`)."""

    agent: str
    status: str  # started | done | failed


@dataclass
class Run:
    """One request's run: what it sends, what it has reserved, and the steps it has taken."""

    execution: Execution
    hold: Hold | None
    group: Group
    request: ChatRequest
    request_id: str  # this request's (a resume has its own; the execution keeps the first)
    brains: list[tuple[CustomModel, ModelEndpoint]]  # the brain, then its fallbacks in order
    messages: list[dict]
    params: dict
    tools: dict[str, Tool]
    mode: str = Mode.NORMAL
    agents: dict[str, Agent] = field(default_factory=dict)
    resumed_round: list[ToolExecution] = field(default_factory=list)  # decided calls to run first
    reserved: int = 0  # worst case of the steps taken or started, covered by `hold`
    steps: list[Step] = field(default_factory=list)  # this request's, in the order they ended
    steps_written: int = 0  # how many of them are in the database already (written while the run works)
    completion_id: str = field(default_factory=lambda: "chatcmpl_" + random_hex())
    created: int = field(default_factory=lambda: int(time.time()))
    settlement: asyncio.Future | None = field(default=None, repr=False)  # the one finish of this request

    @property
    def brain(self) -> CustomModel:
        return self.group.brain

    def kitemesh(self, credits_charged: int | None = None) -> dict:
        body = {"execution_id": str(self.execution.id), "request_id": self.request_id, "mode": self.mode}
        if credits_charged is not None:
            body["credits_charged"] = credits_charged
        return body

    def tool_specs(self) -> list[dict]:
        specs = [tool_spec(t) for t in self.tools.values()]
        if self.mode == Mode.ORCHESTRATION:
            specs.append(delegate_spec(list(self.agents.values())))
        return specs

    async def reserve(self, amount: int) -> None:
        """Make the hold cover the next steps too (402 mid-run when the team cannot)."""
        if self.hold is not None and self.reserved + amount <= self.hold.amount:
            self.reserved += amount
            return
        extra = self.reserved + amount - (self.hold.amount if self.hold else 0)
        if extra > 0:
            self.hold = await self.db(hold_reserve, execution=self.execution, hold=self.hold, amount=extra)
        self.reserved += amount

    async def db(self, work: Callable[..., T], /, **kwargs: Any) -> T:
        """`work(**kwargs)` in a database thread, after writing the steps that ended since the run last
        wrote: a run whose process dies then has on record every model call and tool run it completed,
        which its recovery charges (chat.services.recovery)."""
        steps = self.steps[self.steps_written :]
        self.steps_written = len(self.steps)
        return await in_db_thread(_after_steps_written, steps=steps, work=work, kwargs=kwargs)

    def step_model(
        self, model: CustomModel, agent: str, usage: Usage, started: float, status: str, error: str = ""
    ) -> None:
        """Record a model call (every one ends here, whatever its outcome, so it is measured here too)."""
        elapsed = time.monotonic() - started
        upstream_call_observe(model=model.model, seconds=elapsed)
        self.steps.append(
            Step(
                execution=self.execution,
                kind=Step.Kind.MODEL_CALL,
                agent=agent,
                custom_model=model,
                model_name=model.model,
                status=status,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                usage_estimated=usage.estimated,
                cost=model_cost(model, usage),
                latency_ms=int(elapsed * 1000),
                error=error[:500],
            )
        )

    def step_tool(self, tool_execution: ToolExecution, tool: Tool, result: ToolResult, started: float) -> None:
        tool_run_count(tool=tool.name, sent=result.sent, ok=result.ok)
        self.steps.append(
            Step(
                execution=self.execution,
                kind=Step.Kind.TOOL_CALL,
                tool_execution=tool_execution,
                model_name=tool.name,
                status=Step.Status.SUCCEEDED if result.ok else Step.Status.FAILED,
                cost=tool.price if result.sent else Decimal(0),
                latency_ms=int((time.monotonic() - started) * 1000),
                error=result.error[:500],
            )
        )

    def usage(self) -> dict:
        prompt = sum(s.prompt_tokens for s in self.steps)
        completion = sum(s.completion_tokens for s in self.steps)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def stopped(self, exc: BaseException) -> ApiError | None:
        """Settle a run that stopped on `exc` (every way out of a run but its answer or pause comes here):
        cancelled when the client left, else failed. The error to answer with, None when there is no one
        left to answer."""
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            await self.finish(Execution.Status.CANCELLED)
            return None
        error = exc if isinstance(exc, ApiError) else InternalError()
        if error is not exc:
            logger.error("run %s failed", self.execution.id, exc_info=exc)
        try:
            await self.finish(Execution.Status.FAILED, error=error)
        except InternalError as failure:  # the outcome could not be written (its settlement still ran)
            return failure
        return error

    async def finish(self, status: str, *, response: dict | None = None, error: ApiError | None = None) -> int:
        """Settle the request, once. Shielded: a client that disconnects must not cancel the settlement
        of what it used; and when it disconnects while the settlement runs, the caller's cleanup awaits
        that same settlement instead of starting another. InternalError when the outcome could not be
        written (chat.services.executions.execution_finish)."""
        if self.settlement is None:
            self.settlement = db_future(
                execution_finish,
                execution=self.execution,
                hold=self.hold,
                steps=self.steps,
                steps_written=self.steps_written,
                status=status,
                response=response,
                error=error,
            )
        return await asyncio.shield(self.settlement)

    async def brain_call(self) -> AsyncIterator[str | ModelReply]:
        """One brain call, reserved first and recorded as a step whatever happens: text deltas (when
        streaming), then the reply. When the brain's upstream fails before producing anything, its
        fallbacks answer in turn."""
        specs = self.tool_specs()
        params = {**self.params, "tools": specs} if specs else self.params
        max_tokens = self.params["max_tokens"]
        await self.reserve(max(call_worst_case(model, self.messages, specs, max_tokens) for model, _ in self.brains))
        for attempt, (model, endpoint) in enumerate(self.brains):
            provider, started, produced = provider_for(endpoint), time.monotonic(), []
            try:
                if self.request.stream:
                    async for item in provider.stream(endpoint, self.messages, params):
                        if isinstance(item, ModelReply):
                            reply = item
                        else:
                            produced.append(item)
                            yield item
                else:
                    reply = await provider.complete(endpoint, self.messages, params)
            except ApiError as error:
                upstream_error_count(group=str(self.group.id), code=error.code)
                used = _partial_usage(self.messages, "".join(produced)) if produced else Usage()
                self.step_model(model, "", used, started, Step.Status.FAILED, error.message)
                if produced or attempt == len(self.brains) - 1:
                    raise
                continue  # nothing reached the client: the next fallback answers
            except (asyncio.CancelledError, GeneratorExit):
                used = _partial_usage(self.messages, "".join(produced))
                self.step_model(model, "", used, started, Step.Status.CANCELLED, "client disconnected")
                raise
            self.step_model(model, "", reply.usage, started, Step.Status.SUCCEEDED)
            yield reply
            return

    async def agent_call(self, agent: Agent, messages: list[dict]) -> str:
        """One agent answer (reserved beforehand by the caller), recorded as a step with the agent's
        name; an upstream failure raises ApiError after it is recorded."""
        params = {"max_tokens": self.params["max_tokens"]}
        started = time.monotonic()
        try:
            reply = await provider_for(agent.endpoint).complete(agent.endpoint, messages, params)
        except ApiError as error:
            upstream_error_count(group=str(self.group.id), code=error.code)
            self.step_model(agent.model, agent.name, Usage(), started, Step.Status.FAILED, error.message)
            raise
        except asyncio.CancelledError:
            used = _partial_usage(messages, "")
            self.step_model(agent.model, agent.name, used, started, Step.Status.CANCELLED, "client disconnected")
            raise
        self.step_model(agent.model, agent.name, reply.usage, started, Step.Status.SUCCEEDED)
        return reply.content or ""

    def agent_worst_case(self, agent: Agent, messages: list[dict]) -> int:
        return call_worst_case(agent.model, messages, [], self.params["max_tokens"])

    async def synthesis(self) -> AsyncIterator[Progress]:
        """Every agent answers the client's conversation in parallel (bounded); one failing loses
        nothing of the others; the brain then gets all answers, labelled, failures named."""
        jobs = {name: (agent, agent_messages(agent, self.request.messages)) for name, agent in self.agents.items()}
        await self.reserve(sum(self.agent_worst_case(agent, messages) for agent, messages in jobs.values()))
        answers: dict[str, tuple[str | None, str]] = {}
        async for progress, name, answer, error in _agents_run(self, jobs):
            if progress.status != "started":
                answers[name] = (answer, error)
            yield progress
        self.messages.append(synthesis_note([(name, *answers[name]) for name in self.agents]))

    def round_record(self, reply: ModelReply) -> list[ToolExecution]:
        """The brain's tool calls as tool executions (not saved yet), and its message in the conversation.
        A call without an id, or with one longer than its column, gets one of ours (in both)."""
        for call in reply.tool_calls:
            if not call["id"] or len(call["id"]) > _CALL_ID_LENGTH:
                call["id"] = f"call_{uuid.uuid4().hex[:12]}"
        self.messages.append({"role": "assistant", "content": reply.content, "tool_calls": reply.tool_calls})
        return [self._tool_execution(call) for call in reply.tool_calls]

    def _tool_execution(self, call: dict) -> ToolExecution:
        name = call["function"]["name"]
        tool = self.tools.get(name)
        arguments = call["function"]["arguments"] or "{}"
        needs_approval = bool(tool and tool.requires_approval)
        return ToolExecution(
            execution=self.execution,
            tool=tool,
            tool_name=name[:_TOOL_NAME_LENGTH],  # a longer name is no tool's: the model is told so
            call_id=call["id"],
            arguments=arguments,
            arguments_hash=arguments_hash(arguments),
            requires_approval=needs_approval,
            risk=tool_risk(tool) if tool else (Tool.Risk.LOW if name == DELEGATE_TOOL else Tool.Risk.HIGH),
            status=ToolExecution.Status.PENDING if needs_approval else ToolExecution.Status.APPROVED,
            decided_via="" if needs_approval else ToolExecution.DecidedVia.AUTO,
        )

    async def tools_run(self, calls: list[ToolExecution]) -> AsyncIterator[Progress]:
        """Run the approved calls and delegations (in parallel, each exactly once), tell the model about
        the denied and the unknown ones; tool messages follow in the order the model asked."""
        await self.reserve(tools_price([c.tool for c in calls if _will_send(c)]))
        delegations = [c for c in calls if c.tool_name == DELEGATE_TOOL and self.mode == Mode.ORCHESTRATION]
        contents: dict[uuid.UUID, str] = {}
        if delegations:
            async for progress in self.delegations_run(delegations, contents):
                yield progress
        others = [c for c in calls if c.id not in contents]
        for call, content in zip(others, await asyncio.gather(*(self.tool_message(c) for c in others)), strict=True):
            contents[call.id] = content
        for call in calls:
            self.messages.append({"role": "tool", "tool_call_id": call.call_id, "content": contents[call.id]})

    async def delegations_run(
        self, calls: list[ToolExecution], contents: dict[uuid.UUID, str]
    ) -> AsyncIterator[Progress]:
        """Each delegate call runs its agent on its task; the answer (or why not) is the tool message. One
        that completed before a crash keeps its answer."""
        jobs = {}
        for call in calls:
            if call.status in _COMPLETED:
                contents[call.id] = call.response_body
                continue
            try:
                agent, task = delegate_arguments(call.arguments, self.agents)
            except ValueError as exc:
                contents[call.id] = json.dumps({"error": f"Invalid delegation: {exc}"})
                continue
            jobs[call.id] = (agent, task_messages(agent, task))
        await self.reserve(sum(self.agent_worst_case(agent, messages) for agent, messages in jobs.values()))
        async for progress, call_id, answer, error in _agents_run(self, jobs):
            if progress.status != "started":
                contents[call_id] = (
                    answer if answer is not None else json.dumps({"error": f"The agent failed: {error}"})
                )
            yield progress
        await self.db(_delegations_record, calls=[c for c in calls if c.status not in _COMPLETED], contents=contents)

    async def tool_message(self, call: ToolExecution) -> str:
        if call.tool is None:
            return json.dumps({"error": f"There is no tool named {call.tool_name!r} for this request."})
        if call.status == ToolExecution.Status.DENIED:
            reason = f": {call.decision_reason}" if call.decision_reason else ""
            return json.dumps({"error": f"The tool call was denied by {call.decided_by or 'the approver'}{reason}"})
        if call.status in _COMPLETED:  # before a crash: its result is kept, it is not sent again
            return _recorded_result(call).model_content()
        if not _will_send(call):
            return json.dumps({"error": UNKNOWN_OUTCOME})
        if not await self.db(tool_execution_start, tool_execution=call):
            return json.dumps({"error": "This tool call was already run."})
        started = time.monotonic()
        result = await _tool_result(call)
        self.step_tool(call, call.tool, result, started)
        await self.db(
            tool_execution_finish,
            tool_execution=call,
            ok=result.ok,
            status_code=result.status_code,
            body=result.body,
            error=result.error,
        )
        return result.model_content()

    async def pause(self, calls: list[ToolExecution]) -> Pause:
        waiting = [c for c in calls if c.requires_approval]
        tool_calls = [
            {"id": str(c.id), "type": "function", "function": {"name": c.tool_name, "arguments": c.arguments}}
            for c in waiting
        ]
        response = completion_body(
            completion_id=self.completion_id,
            created=self.created,
            model=self.request.model,
            message={"role": "assistant", "content": None, "tool_calls": tool_calls},
            finish_reason="tool_calls",
            usage=self.usage(),
            kitemesh=self.kitemesh(),
        )
        paused = await in_db_thread(
            approval_pause,
            execution=self.execution,
            group=self.group,
            hold=self.hold,
            steps=self.steps,
            steps_written=self.steps_written,
            tool_executions=calls,
            state={"messages": self.messages, "params": self.params, "mode": self.mode},
            hold_amount=tools_price([c.tool for c in calls]),
            response=response,
        )
        return Pause(approval=paused.approval, response=response)


def _partial_usage(messages: list[dict], produced: str) -> Usage:
    """What a call cut short has used, estimated (the upstream reports usage only at the end).
    A call that failed before producing anything is not charged; see README, Billing."""
    return Usage(tokens_estimate(prompt_length(messages)), tokens_estimate(len(produced)), estimated=True)


def _delegations_record(calls: list[ToolExecution], contents: dict[uuid.UUID, str]) -> None:
    """Delegations are tool executions too, so the execution's record shows what each agent was asked
    and answered (an interrupted round resumed again keeps those answers)."""
    for call in calls:
        if tool_execution_start(tool_execution=call):
            failed = contents[call.id].startswith('{"error"')
            tool_execution_finish(
                tool_execution=call, ok=not failed, status_code=None, body=contents[call.id], error=""
            )


def _after_steps_written(*, steps: list[Step], work: Callable[..., T], kwargs: dict) -> T:
    if steps:
        steps_write(steps=steps)
    return work(**kwargs)


_COMPLETED = (ToolExecution.Status.SUCCEEDED, ToolExecution.Status.FAILED)
UNKNOWN_OUTCOME = (
    "The outcome of this tool call is unknown: KiteMesh stopped while sending it, so it may or may not have "
    "taken effect. It was not sent again."
)


def _will_send(call: ToolExecution) -> bool:
    """Approved and not yet sent, or (an idempotent tool's) sent before a crash with no known outcome."""
    Status = ToolExecution.Status
    return call.status == Status.APPROVED or (
        call.status == Status.UNKNOWN and call.tool is not None and call.tool.idempotent
    )


def _recorded_result(call: ToolExecution) -> ToolResult:
    return ToolResult(
        sent=call.response_status is not None,
        status_code=call.response_status,
        body=call.response_body,
        error=call.error,
    )


async def _agents_run(run: Run, jobs: dict) -> AsyncIterator[tuple[Progress, object, str | None, str]]:
    """Run agent calls concurrently (at most AGENT_CONCURRENCY at once) and report as they go:
    (Progress, key, answer or None, error). `jobs` maps a key to (agent, messages)."""
    limit = asyncio.Semaphore(AGENT_CONCURRENCY)

    async def one(key: object, agent: Agent, messages: list[dict]) -> tuple:
        async with limit:
            try:
                return key, agent, await run.agent_call(agent, messages), ""
            except ApiError as error:
                return key, agent, None, error.message

    for key, (agent, _) in jobs.items():
        yield Progress(agent=agent.name, status="started"), key, None, ""
    tasks = [asyncio.ensure_future(one(key, agent, messages)) for key, (agent, messages) in jobs.items()]
    try:
        for finished in asyncio.as_completed(tasks):
            key, agent, answer, error = await finished
            yield Progress(agent=agent.name, status="done" if answer is not None else "failed"), key, answer, error
    finally:
        for task in tasks:
            task.cancel()
        # Let cancelled agents record their steps before the run settles what it used.
        await asyncio.gather(*tasks, return_exceptions=True)


async def _tool_result(call: ToolExecution) -> ToolResult:
    """What was approved is what is sent: the stored arguments, re-checked against their hash."""
    if arguments_hash(call.arguments) != call.arguments_hash:
        return ToolResult(sent=False, status_code=None, body="", error="The arguments changed after approval.")
    try:
        arguments = tool_arguments_parse(call.tool, call.arguments)
    except ToolArgumentsInvalid as exc:
        return ToolResult(sent=False, status_code=None, body="", error=f"Invalid arguments, not sent: {exc}")
    return await tool_call_run(tool=call.tool, arguments=arguments, idempotency_key=str(call.id))


async def run_events(run: Run) -> AsyncIterator[str | Progress | Answer | Pause]:
    """The loop: [agents] → brain → tool calls → tools and delegations (or a pause for approval) →
    brain, until it answers."""
    if run.resumed_round:
        async for progress in run.tools_run(run.resumed_round):
            yield progress
        run.messages.extend(run.request.messages)
    elif run.mode == Mode.SYNTHESIS:
        async for progress in run.synthesis():
            yield progress
    for rounds in range(MAX_TOOL_ROUNDS + 1):
        reply = None
        async for item in run.brain_call():
            if isinstance(item, ModelReply):
                reply = item
            else:
                yield item
        if not reply.tool_calls:
            yield Answer(reply)
            return
        if rounds == MAX_TOOL_ROUNDS:
            break  # before recording or running anything of a round that would not reach the brain
        calls = run.round_record(reply)
        if any(c.requires_approval for c in calls):
            yield await run.pause(calls)
            return
        await run.db(ToolExecution.objects.bulk_create, objs=calls)
        async for progress in run.tools_run(calls):
            yield progress
    raise UpstreamError(
        f"The brain asked for tools {MAX_TOOL_ROUNDS} rounds in a row; the run was stopped.",
        code="tool_rounds_exceeded",
    )


# --- Starting a run -------------------------------------------------------------------------------


@dataclass
class Replay:
    """An earlier execution with the same request_id and body: its result is answered again."""

    execution: Execution

    def body(self) -> dict:
        return self.execution.response  # a run that never answered does not keep its request_id


def _max_tokens(group: Group, request: ChatRequest) -> int:
    return request.max_tokens or group.max_output_tokens or settings.KITEMESH_DEFAULT_MAX_OUTPUT_TOKENS


def _first_hold(
    brain: CustomModel,
    messages: list[dict],
    specs: list[dict],
    max_tokens: int,
    agents: dict,
    mode: str,
    request: ChatRequest,
) -> int:
    """What a request reserves before anything is called: its first brain call, and in synthesis every
    agent's call and the brain's reading of their answers, so a team that cannot pay gets 402 before
    any model runs."""
    if mode != Mode.SYNTHESIS:
        return call_worst_case(brain, messages, specs, max_tokens)
    agent_calls = sum(
        call_worst_case(a.model, agent_messages(a, request.messages), [], max_tokens) for a in agents.values()
    )
    # The brain then reads every agent's answer (up to max_tokens each) in the synthesis note.
    note = synthesis_note([(name, "x" * max_tokens * 4, "") for name in agents])
    return agent_calls + call_worst_case(brain, [*messages, note], specs, max_tokens)


def _brains(brain: CustomModel, fallbacks: list[CustomModel]) -> list[tuple[CustomModel, ModelEndpoint]]:
    return [(model, model_endpoint_get(model)) for model in [brain, *fallbacks]]


def _agents(agents: list[GroupAgent]) -> dict[str, Agent]:
    return {a.name: Agent.of(a, model_endpoint_get(a.model)) for a in agents}


async def run_start(
    *,
    token: ApiToken,
    group: Group,
    agents: list[GroupAgent],
    tools: list[Tool],
    fallbacks: list[CustomModel],
    request: ChatRequest,
    request_id: str,
) -> Run | Replay:
    mode = mode_resolve(group, request.mode, has_agents=bool(agents), has_tools=bool(tools))
    brain = group.brain
    messages = ([{"role": "system", "content": brain.system}] if brain.system else []) + request.messages
    params = {**request.upstream_params(), "max_tokens": _max_tokens(group, request)}
    run_agents = _agents(agents) if mode != Mode.NORMAL else {}
    specs = [tool_spec(t) for t in tools] + (
        [delegate_spec(list(run_agents.values()))] if mode == Mode.ORCHESTRATION else []
    )
    start = await _started(
        execution_start,
        token=token,
        group=group,
        mode=mode,
        request_id=request_id,
        client_request_id=request.request_id is not None,
        body_hash=request.body_hash,
        stream=request.stream,
        metadata={**request.metadata, "requested_mode": request.mode or group.mode},
        hold_amount=_first_hold(brain, messages, specs, params["max_tokens"], run_agents, mode, request),
    )
    if start.replayed:
        return Replay(start.execution)
    return Run(
        execution=start.execution,
        hold=start.hold,
        group=group,
        request=request,
        request_id=request_id,
        brains=_brains(brain, fallbacks),
        messages=messages,
        params=params,
        tools={t.name: t for t in tools},
        mode=mode,
        agents=run_agents,
    )


async def _started(start: Callable[..., ExecutionStart], **kwargs) -> ExecutionStart:
    """`start(**kwargs)` in a database thread, seen through when the client goes away meanwhile: the
    execution it records is then settled as cancelled at once, its hold released, rather than left running
    for the stale-hold sweep."""
    recording = db_future(start, **kwargs)
    try:
        return await asyncio.shield(recording)
    except asyncio.CancelledError:
        started = None
        with contextlib.suppress(Exception):  # refused or failed: nothing was recorded
            started = await recording
        if started is not None and not started.replayed:
            cancelled = Execution.Status.CANCELLED
            await in_db_thread(
                execution_finish, execution=started.execution, hold=started.hold, steps=[], status=cancelled
            )
        raise


def run_resume(
    *,
    claim: ResumeClaim,
    agents: list[GroupAgent],
    tools: list[Tool],
    fallbacks: list[CustomModel],
    request: ChatRequest,
    request_id: str,
) -> Run:
    """Continue a paused run: the round's decided calls run first (in run_events), then the resume's
    messages follow and the loop goes on."""
    state = claim.approval.state
    group = claim.approval.group
    run = Run(
        execution=claim.execution,
        hold=claim.hold,
        group=group,
        request=request,
        request_id=request_id,
        brains=_brains(group.brain, fallbacks),
        messages=state["messages"],
        params={
            **state["params"],
            **request.upstream_params(),
            "max_tokens": request.max_tokens or state["params"]["max_tokens"],
        },
        tools={t.name: t for t in tools},
        mode=state.get("mode", Mode.NORMAL),
        agents=_agents(agents),
        resumed_round=claim.tool_executions,
    )
    return run


def resume_hold(
    *, group: Group, agents: list[GroupAgent], tools: list[Tool], approval: Approval, request: ChatRequest
) -> Callable[[list[ToolExecution]], int]:
    """What a resume holds when it claims the approval, so a team that cannot pay gets 402 before any
    tool runs (and the approval stays pending): the prices of the tools it will run, the worst case of
    the round's delegations, and the next brain call's over the conversation as it stands (tool
    results, unknown yet, are reserved when they are in)."""
    state = approval.state
    specs = [tool_spec(t) for t in tools]
    run_agents = _agents(agents) if state.get("mode") == Mode.ORCHESTRATION else {}
    if run_agents:
        specs.append(delegate_spec(list(run_agents.values())))
    max_tokens = request.max_tokens or state["params"]["max_tokens"]
    brain = call_worst_case(group.brain, state["messages"] + request.messages, specs, max_tokens)

    def delegation(call: ToolExecution) -> int:
        try:
            agent, task = delegate_arguments(call.arguments, run_agents)
        except ValueError:
            return 0  # refused without calling anyone
        return call_worst_case(agent.model, task_messages(agent, task), [], max_tokens)

    def amount(round_calls: list[ToolExecution]) -> int:
        running = [c.tool for c in round_calls if c.status != ToolExecution.Status.DENIED and c.tool is not None]
        delegations = [c for c in round_calls if c.tool_name == DELEGATE_TOOL and run_agents]
        return tools_price(running) + sum(delegation(c) for c in delegations) + brain

    return amount


# --- Rendering ------------------------------------------------------------------------------------


def _delta_tool_calls(tool_calls: list[dict]) -> list[dict]:
    return [{"index": i, **call} for i, call in enumerate(tool_calls)]


async def _lease_renewals(execution: Execution) -> None:
    """While a run works, its process renews the lease on its execution, every third of
    KITEMESH_RUN_LEASE_SECONDS (run_complete and run_stream cancel this when the run ends): a lease left to
    lapse tells the sweep and any reader that the process died (chat.services.recovery)."""
    while True:
        await asyncio.sleep(settings.KITEMESH_RUN_LEASE_SECONDS / 3)
        try:
            await in_db_thread(execution_lease_renew, execution=execution)
        except Exception:  # the database is away: try again at the next turn, before the lease lapses
            logger.warning("run %s: its lease could not be renewed", execution.id, exc_info=True)


async def run_complete(run: Run) -> dict:
    """Answer a request with one JSON body: the final answer, or the approval pause."""
    renewals = asyncio.ensure_future(_lease_renewals(run.execution))
    try:
        async for event in run_events(run):
            if isinstance(event, Pause):
                return event.response
            if isinstance(event, Answer):
                body = completion_body(
                    completion_id=run.completion_id,
                    created=run.created,
                    model=run.request.model,
                    message={"role": "assistant", "content": event.reply.content},
                    finish_reason=event.reply.finish_reason,
                    usage=run.usage(),
                    kitemesh=run.kitemesh(credits_charged=0),
                )
                await run.finish(Execution.Status.SUCCEEDED, response=body)
                return body
    except BaseException as exc:
        error = await run.stopped(exc)
        if error is None or error is exc:
            raise
        raise error from exc
    finally:
        renewals.cancel()
    raise AssertionError("run_events ends with an answer or a pause")


async def run_stream(run: Run) -> AsyncIterator[bytes]:
    """Relay the run as SSE, text as the brain produces it. An error before the first event is raised
    (the view answers it with its HTTP status); after that it is one error event, then [DONE]."""
    chunk = {"completion_id": run.completion_id, "created": run.created, "model": run.request.model}
    opening = sse_event(chunk_body(**chunk, delta={"role": "assistant", "content": ""}))
    sent = False
    events = run_events(run)
    renewals = asyncio.ensure_future(_lease_renewals(run.execution))
    try:
        async for event in events:
            if not sent:
                sent = True
                yield opening
            if isinstance(event, str):
                yield sse_event(chunk_body(**chunk, delta={"content": event}))
                continue
            if isinstance(event, Progress):
                progress = {**run.kitemesh(), "progress": {"agent": event.agent, "status": event.status}}
                yield sse_event(chunk_body(**chunk, delta={}, kitemesh=progress))
                continue
            if isinstance(event, Answer):
                final = completion_body(
                    **chunk,
                    message={"role": "assistant", "content": event.reply.content},
                    finish_reason=event.reply.finish_reason,
                    usage=run.usage(),
                    kitemesh=run.kitemesh(credits_charged=0),
                )
                await run.finish(Execution.Status.SUCCEEDED, response=final)
                finish_reason, delta, kitemesh = event.reply.finish_reason, {}, final["kitemesh"]
            else:
                tool_calls = event.response["choices"][0]["message"]["tool_calls"]
                finish_reason, delta = "tool_calls", {"tool_calls": _delta_tool_calls(tool_calls)}
                kitemesh = event.response["kitemesh"]
            yield sse_event(chunk_body(**chunk, delta=delta, finish_reason=finish_reason, kitemesh=kitemesh))
            if run.request.include_usage:
                yield sse_event(chunk_body(**chunk, usage=run.usage()))
            yield SSE_DONE
            return
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            # Closed at a yield (not cancelled mid-await), the inner loop is suspended: stop its agents
            # and calls now so their steps are recorded before the run settles.
            await events.aclose()
        error = await run.stopped(exc)
        if error is None:
            raise
        if not sent:
            if error is exc:
                raise
            raise error from exc
        yield sse_event(error_body(error, run.request_id))
        yield SSE_DONE
    finally:
        renewals.cancel()


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
