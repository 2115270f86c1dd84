"""The decision form of the approver page: one tool call (or all of them) approved or denied, with a reason;
one call approved with edited arguments."""

import uuid

from django import forms

from approvals.selectors import ApprovalDetail
from core.models import ToolExecution

ALL = "all"


class ApprovalDecisionForm(forms.Form):
    """`tool_execution` is a call of this approval still waiting for a decision, or "all"; a `batch` group
    decides all at once only (the API's rule for batch groups, applied on the page too)."""

    tool_execution = forms.CharField(max_length=36)
    decision = forms.ChoiceField(choices=[("approve", "Approve"), ("deny", "Deny")])
    reason = forms.CharField(max_length=500, required=False)
    arguments = forms.CharField(max_length=65536, required=False, strip=False)  # an edit: JSON of an object

    def __init__(self, *args, detail: ApprovalDetail, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.detail = detail

    def clean_tool_execution(self) -> ToolExecution | None:
        """The call to decide, or None for all of them."""
        value = self.cleaned_data["tool_execution"]
        if value == ALL:
            return None
        if self.detail.batch:
            raise forms.ValidationError("This group decides in batch: approve all or deny all.")
        try:
            wanted = uuid.UUID(value)
        except ValueError:
            raise forms.ValidationError("Not a tool call of this approval.") from None
        for call in self.detail.calls:
            if call.tool_execution.id == wanted:
                return call.tool_execution
        raise forms.ValidationError("Not a tool call of this approval.")

    def clean_arguments(self) -> str | None:
        """The edited arguments, or None when the approver changed nothing."""
        value = self.cleaned_data["arguments"]
        return value if value.strip() else None

    @property
    def approve(self) -> bool:
        return self.cleaned_data["decision"] == "approve"
