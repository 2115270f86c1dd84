"""A group's agents as a run uses them, and their calls: one at a time for a delegation, several at once
(bounded) for synthesis; each recorded as a step with the agent's name."""

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from billing.pricing import call_worst_case
from chat.engine.providers import ModelEndpoint, Usage, provider_for
from chat.engine.run import Progress, Run, partial_usage
from chat.metrics import upstream_error_count
from chat.selectors import model_endpoint_get
from core.errors import KiteMeshError
from core.models import CustomModel, GroupAgent, Step

AGENT_CONCURRENCY = 4  # agent calls in flight at once for one request


@dataclass
class Agent:
    """A group agent as a run uses it: its name, model, endpoint and system instruction."""

    name: str
    model: CustomModel
    endpoint: ModelEndpoint
    system: str

    @classmethod
    def of(cls, agent: GroupAgent) -> "Agent":
        system = agent.role or agent.model.system
        return cls(name=agent.name, model=agent.model, endpoint=model_endpoint_get(agent.model), system=system)


def agents_of(agents: list[GroupAgent]) -> dict[str, Agent]:
    return {a.name: Agent.of(a) for a in agents}


def agent_worst_case(run: Run, agent: Agent, messages: list[dict]) -> int:
    return call_worst_case(agent.model, messages, [], run.params["max_tokens"])


async def agent_call(run: Run, agent: Agent, messages: list[dict]) -> str:
    """One agent answer (reserved beforehand by the caller), recorded as a step with the agent's name; an
    upstream failure raises KiteMeshError after it is recorded."""
    params = {"max_tokens": run.params["max_tokens"]}
    started = time.monotonic()
    try:
        reply = await provider_for(agent.endpoint).complete(agent.endpoint, messages, params)
    except KiteMeshError as error:
        upstream_error_count(group=str(run.group.id), code=error.code)
        run.step_model(agent.model, agent.name, Usage(), started, Step.Status.FAILED, error.message)
        raise
    except asyncio.CancelledError:
        used = partial_usage(messages, "")
        run.step_model(agent.model, agent.name, used, started, Step.Status.CANCELLED, "client disconnected")
        raise
    run.step_model(agent.model, agent.name, reply.usage, started, Step.Status.SUCCEEDED)
    return reply.content or ""


async def agents_run(run: Run, jobs: dict) -> AsyncIterator[tuple[Progress, object, str | None, str]]:
    """Run agent calls concurrently (at most AGENT_CONCURRENCY at once) and report as they go:
    (Progress, key, answer or None, error). `jobs` maps a key to (agent, messages)."""
    limit = asyncio.Semaphore(AGENT_CONCURRENCY)

    async def one(key: object, agent: Agent, messages: list[dict]) -> tuple:
        async with limit:
            try:
                return key, agent, await agent_call(run, agent, messages), ""
            except KiteMeshError as error:
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
