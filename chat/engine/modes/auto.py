"""`auto`: KiteMesh picks the mode, by a rule rather than a model call (cheap, deterministic, free)."""

from core.errors import InvalidRequest
from core.models import Group, Mode


def mode_resolve(group: Group, requested: str | None, *, has_agents: bool, has_tools: bool) -> str:
    """The mode a request runs in: the one asked for (else the group's); `auto` resolves to normal with no
    agents, orchestration with agents and tools (the brain delegates and acts), synthesis with agents
    only (every agent's view, one answer)."""
    mode = requested or group.mode
    if mode == Mode.AUTO:
        if not has_agents:
            return Mode.NORMAL
        return Mode.ORCHESTRATION if has_tools else Mode.SYNTHESIS
    if mode in (Mode.SYNTHESIS, Mode.ORCHESTRATION) and not has_agents:
        raise InvalidRequest(f"Mode {mode!r} needs a group with agents; this group has none.", param="metadata.mode")
    return mode
