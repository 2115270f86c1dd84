"""An approver's edit of a call's arguments (SPEC §6, Edit, then approve), from the API's resume or the
decision page: checked against the tool's schema and its approval rules (an edit may narrow a call, never
slip past policy), then applied: the edited arguments become the ones that run, bound by their hash, and
the model's are kept beside them."""

from approvals.rules import DENY, rule_decision
from core.errors import PermissionDenied
from core.models import ToolExecution
from core.tool_arguments import ToolArgumentsInvalid, arguments_hash, edit_invalid, tool_arguments_parse

EDITED_FIELDS = ["original_arguments", "arguments", "arguments_hash"]


def edit_check(te: ToolExecution, arguments: str, *, param: str | None) -> None:
    """400 (`invalid_tool_arguments`) unless the arguments pass the tool's schema; 403 when one of its
    approval rules would deny them. `param` names the field in the error."""
    if te.tool is None:
        raise edit_invalid("are for a tool that no longer exists", param=param)
    try:
        tool_arguments_parse(te.tool, arguments)
    except ToolArgumentsInvalid as exc:
        raise edit_invalid(f"fail the tool's schema: {exc}", param=param) from None
    rule = rule_decision(te.tool, arguments)
    if rule is not None and rule.then == DENY:
        reason = f" ({rule.reason})" if rule.reason else ""
        raise PermissionDenied(
            f"The approval rule {rule.name!r} denies these arguments{reason}; nothing was decided or run.",
            param=param,
        )


def edit_apply(te: ToolExecution, arguments: str) -> list[str]:
    """Make `arguments` the call's (the model's kept, once); the fields to write."""
    if te.original_arguments is None:
        te.original_arguments = te.arguments
    te.arguments, te.arguments_hash = arguments, arguments_hash(arguments)
    return EDITED_FIELDS
