"""A round of tool calls the brain asked for: recorded as tool executions, run (in parallel, each exactly
once, delegations to agents included) or paused for approval, and answered to the model as tool messages
in the order it asked. A round resumed after a crash keeps what completed and does not send a call whose
outcome is unknown again, unless its tool is idempotent."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable

from django.utils import timezone

from approvals.rules import APPROVE, ASK, RuleDecision, rule_decision
from approvals.services import approval_pause
from billing.pricing import tools_price
from chat.engine.agents import Agent
from chat.engine.modes.orchestration import DELEGATE_TOOL, delegate_spec, delegations_run
from chat.engine.providers import ModelReply
from chat.engine.run import Pause, Progress, Run
from chat.engine.tools import ToolResult, tool_call_run, tool_risk, tool_spec
from chat.services.executions import tool_execution_finish, tool_execution_start
from core.db import in_db_thread
from core.models import Mode, Tool, ToolExecution
from core.tool_arguments import ToolArgumentsInvalid, arguments_hash, tool_arguments_parse

_CALL_ID_LENGTH = ToolExecution._meta.get_field("call_id").max_length
_TOOL_NAME_LENGTH = ToolExecution._meta.get_field("tool_name").max_length
_COMPLETED = (ToolExecution.Status.SUCCEEDED, ToolExecution.Status.FAILED)
RUNNING, SUCCEEDED, FAILED, DENIED = "running", "succeeded", "failed", "denied"  # a call's progress
UNKNOWN_OUTCOME = (
    "The outcome of this tool call is unknown: KiteMesh stopped while sending it, so it may or may not have "
    "taken effect. It was not sent again."
)


def tool_specs(tools: Iterable[Tool], mode: str, agents: dict[str, Agent]) -> list[dict]:
    """What the brain is offered: the group's tools the token may use, and in orchestration the delegate."""
    specs = [tool_spec(t) for t in tools]
    if mode == Mode.ORCHESTRATION:
        specs.append(delegate_spec(list(agents.values())))
    return specs


def round_record(run: Run, reply: ModelReply) -> list[ToolExecution]:
    """The brain's tool calls as tool executions (not saved yet), and its message in the conversation.
    A call without an id, or with one longer than its column, gets one of ours (in both)."""
    for call in reply.tool_calls:
        if not call["id"] or len(call["id"]) > _CALL_ID_LENGTH:
            call["id"] = f"call_{uuid.uuid4().hex[:12]}"
    run.messages.append({"role": "assistant", "content": reply.content, "tool_calls": reply.tool_calls})
    return [_tool_execution(run, call) for call in reply.tool_calls]


def _tool_execution(run: Run, call: dict) -> ToolExecution:
    name = call["function"]["name"]
    tool = run.tools.get(name)
    arguments = call["function"]["arguments"] or "{}"
    tool_execution = ToolExecution(
        execution=run.execution,
        tool=tool,
        tool_name=name[:_TOOL_NAME_LENGTH],  # a longer name is no tool's: the model is told so
        call_id=call["id"],
        arguments=arguments,
        arguments_hash=arguments_hash(arguments),
        risk=tool_risk(tool) if tool else (Tool.Risk.LOW if name == DELEGATE_TOOL else Tool.Risk.HIGH),
    )
    _decide(tool_execution, rule_decision(tool, arguments) if tool else None)
    return tool_execution


def _decide(call: ToolExecution, rule: RuleDecision | None) -> None:
    """A new call's decision: its tool's first matching approval rule's, else its `requires_approval`."""
    Status = ToolExecution.Status
    if rule is not None and rule.then != ASK:
        call.status = Status.APPROVED if rule.then == APPROVE else Status.DENIED
        call.decided_via, call.decided_by, call.decided_at = ToolExecution.DecidedVia.RULE, rule.name, timezone.now()
        call.decision_reason = rule.reason
        return
    call.requires_approval = rule is not None or bool(call.tool and call.tool.requires_approval)
    call.approvals_required = call.tool.approvals_required if call.requires_approval and call.tool else 1
    call.status = Status.PENDING if call.requires_approval else Status.APPROVED
    call.decided_via = "" if call.requires_approval else ToolExecution.DecidedVia.AUTO


async def tools_run(run: Run, calls: list[ToolExecution]) -> AsyncIterator[Progress]:
    """Run the approved calls and delegations (in parallel, each exactly once), tell the model about the
    denied and the unknown ones; tool messages follow in the order the model asked."""
    await run.reserve(tools_price([c.tool for c in calls if _will_send(c)]))
    delegations = [c for c in calls if c.tool_name == DELEGATE_TOOL and run.mode == Mode.ORCHESTRATION]
    contents: dict[uuid.UUID, str] = {}
    if delegations:
        async for progress in delegations_run(run, delegations, contents):
            yield progress
    others = [c for c in calls if c.id not in contents]
    for call in others:
        if call.tool is not None and _will_send(call):
            yield Progress(tool=call.tool_name, status=RUNNING)
    async for call, content, status in _as_completed(run, others):
        contents[call.id] = content
        yield Progress(tool=call.tool_name, status=status)
    for call in calls:
        run.messages.append({"role": "tool", "tool_call_id": call.call_id, "content": contents[call.id]})


async def _as_completed(run: Run, calls: list[ToolExecution]) -> AsyncIterator[tuple[ToolExecution, str, str]]:
    """The calls' (call, tool message, status), run in parallel, as each completes."""

    async def one(call: ToolExecution) -> tuple[ToolExecution, str, str]:
        return call, *await tool_message(run, call)

    tasks = [asyncio.ensure_future(one(call)) for call in calls]
    try:
        for finished in asyncio.as_completed(tasks):
            yield await finished
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def tool_message(run: Run, call: ToolExecution) -> tuple[str, str]:
    """What the model is told of one call, and how it went (succeeded, failed, denied): its result,
    sending it first when it is due to be sent."""
    if call.tool is None:
        return json.dumps({"error": f"There is no tool named {call.tool_name!r} for this request."}), FAILED
    if call.status == ToolExecution.Status.DENIED:
        run.step_denied(call)
        return json.dumps({"error": _denial(call)}), DENIED
    if call.status in _COMPLETED:  # before a crash: its result is kept, it is not sent again
        status = SUCCEEDED if call.status == ToolExecution.Status.SUCCEEDED else FAILED
        return _recorded_result(call).model_content(**_edit_told(call)), status
    if not _will_send(call):
        return json.dumps({"error": UNKNOWN_OUTCOME}), FAILED
    if not await run.db(tool_execution_start, tool_execution=call):
        return json.dumps({"error": "This tool call was already run."}), FAILED
    started = time.monotonic()
    result = await _tool_result(call)
    run.step_tool(call, call.tool, result, started)
    await run.db(
        tool_execution_finish,
        tool_execution=call,
        ok=result.ok,
        status_code=result.status_code,
        body=result.body,
        error=result.error,
    )
    return result.model_content(**_edit_told(call)), SUCCEEDED if result.ok else FAILED


def _edit_told(call: ToolExecution) -> dict:
    """What the model is told of an approver's edit: that it happened, and the arguments that ran."""
    if not call.edited:
        return {}
    note = "An approver changed the arguments of this call before it ran; it ran with edited_arguments."
    return {"note": note, "edited_arguments": json.loads(call.arguments)}


def _denial(call: ToolExecution) -> str:
    """What the model is told of a denied call: by whom (a person, a token or a rule) and why."""
    if call.decided_via == ToolExecution.DecidedVia.RULE:
        by = f"the approval rule {call.decided_by!r}"
    else:
        by = call.decided_by or "the approver"
    reason = f": {call.decision_reason}" if call.decision_reason else ""
    return f"The tool call was denied by {by}{reason}"


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


async def _tool_result(call: ToolExecution) -> ToolResult:
    """What was approved is what is sent: the stored arguments, re-checked against their hash."""
    if arguments_hash(call.arguments) != call.arguments_hash:
        return ToolResult(sent=False, status_code=None, body="", error="The arguments changed after approval.")
    try:
        arguments = tool_arguments_parse(call.tool, call.arguments)
    except ToolArgumentsInvalid as exc:
        return ToolResult(sent=False, status_code=None, body="", error=f"Invalid arguments, not sent: {exc}")
    return await tool_call_run(tool=call.tool, arguments=arguments, idempotency_key=str(call.id))


async def pause(run: Run, calls: list[ToolExecution]) -> Pause:
    """Stop at a round that needs decisions: settle what the run used, keep the round and the
    conversation with an approval, and answer the calls that wait (each id its tool execution's)."""
    waiting = [c for c in calls if c.requires_approval]
    tool_calls = [
        {"id": str(c.id), "type": "function", "function": {"name": c.tool_name, "arguments": c.arguments}}
        for c in waiting
    ]
    response = run.body({"role": "assistant", "content": None, "tool_calls": tool_calls}, "tool_calls")
    paused = await in_db_thread(  # (the pause writes the run's steps itself, with its settlement)
        approval_pause,
        execution=run.execution,
        group=run.group,
        hold=run.hold,
        steps=run.steps,
        steps_written=run.steps_written,
        tool_executions=calls,
        state={"messages": run.messages, "params": run.params, "mode": run.mode},
        hold_amount=tools_price([c.tool for c in calls]),
        response=response,
    )
    return Pause(approval=paused.approval, response=response)
