"""`orchestration`: the brain is offered a delegate tool and hands self-contained sub-tasks to its agents,
several per round, over several rounds; each delegation is a tool execution, its answer the tool message."""

import json
import uuid
from collections.abc import AsyncIterator

from chat.engine.agents import Agent, agent_worst_case, agents_run
from chat.engine.run import Progress, Run
from chat.services.executions import tool_execution_finish, tool_execution_start
from core.models import ToolExecution

DELEGATE_TOOL = "delegate_to_agent"
_COMPLETED = (ToolExecution.Status.SUCCEEDED, ToolExecution.Status.FAILED)


def delegate_spec(agents: list[Agent]) -> dict:
    """The tool orchestration offers the brain."""
    described = "; ".join(f"{a.name}: {a.system[:200]}" if a.system else a.name for a in agents)
    return {
        "type": "function",
        "function": {
            "name": DELEGATE_TOOL,
            "description": (
                f"Hand a self-contained sub-task to one of your agents and get its answer. Agents: {described}"
            ),
            "parameters": {
                "type": "object",
                "properties": {
                    "agent": {"type": "string", "enum": [a.name for a in agents]},
                    "task": {"type": "string", "description": "Everything the agent needs to do the task."},
                },
                "required": ["agent", "task"],
            },
        },
    }


def delegate_arguments(arguments: str, agents: dict[str, Agent]) -> tuple[Agent, str]:
    """The agent and task of a delegate call; ValueError with a message for the brain otherwise."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        raise ValueError("arguments are not valid JSON") from None
    if not isinstance(value, dict) or not isinstance(value.get("task"), str) or not value["task"].strip():
        raise ValueError("give an 'agent' name and a non-empty 'task'")
    agent = agents.get(value.get("agent"))
    if agent is None:
        raise ValueError(f"no agent named {value.get('agent')!r}; agents: {', '.join(agents)}")
    return agent, value["task"]


def task_messages(agent: Agent, task: str) -> list[dict]:
    """What an agent is sent for a delegated task: its instruction and the task alone."""
    return ([{"role": "system", "content": agent.system}] if agent.system else []) + [{"role": "user", "content": task}]


async def delegations_run(
    run: Run, calls: list[ToolExecution], contents: dict[uuid.UUID, str]
) -> AsyncIterator[Progress]:
    """Each delegate call runs its agent on its task; the answer (or why not) is the tool message. One
    that completed before a crash keeps its answer."""
    jobs = {}
    for call in calls:
        if call.status in _COMPLETED:
            contents[call.id] = call.response_body
            continue
        try:
            agent, task = delegate_arguments(call.arguments, run.agents)
        except ValueError as exc:
            contents[call.id] = json.dumps({"error": f"Invalid delegation: {exc}"})
            continue
        jobs[call.id] = (agent, task_messages(agent, task))
    await run.reserve(sum(agent_worst_case(run, agent, messages) for agent, messages in jobs.values()))
    async for progress, call_id, answer, error in agents_run(run, jobs):
        if progress.status != "started":
            contents[call_id] = answer if answer is not None else json.dumps({"error": f"The agent failed: {error}"})
        yield progress
    await run.db(_delegations_record, calls=[c for c in calls if c.status not in _COMPLETED], contents=contents)


def _delegations_record(calls: list[ToolExecution], contents: dict[uuid.UUID, str]) -> None:
    """Delegations are tool executions too, so the execution's record shows what each agent was asked
    and answered (an interrupted round resumed again keeps those answers)."""
    for call in calls:
        if tool_execution_start(tool_execution=call):
            failed = contents[call.id].startswith('{"error"')
            tool_execution_finish(
                tool_execution=call, ok=not failed, status_code=None, body=contents[call.id], error=""
            )
