"""The chat pages' forms: a message (and, for a new chat, its group and mode), a conversation's title."""

from django import forms
from django.conf import settings

from chat.services.conversations import TITLE_MAX_LENGTH
from core.models import Mode

MODES = [
    (Mode.AUTO, "Auto"),
    (Mode.NORMAL, "Normal"),
    (Mode.ORCHESTRATION, "Orchestration"),
    (Mode.SYNTHESIS, "Synthesis"),
]


class MessageForm(forms.Form):
    message = forms.CharField(
        label="Message",
        max_length=settings.KITEMESH_CHAT_MESSAGE_MAX_CHARS,
        widget=forms.Textarea(attrs={"rows": 3}),
        error_messages={
            "required": "Write a message first.",
            "max_length": "A message has at most %(limit_value)d characters (this one has %(show_value)d).",
        },
    )


class NewChatForm(MessageForm):
    """`group` is one of the user's teams' groups (checked by the view: chat.selectors.member_group_get)."""

    group = forms.UUIDField(label="Group", error_messages={"required": "Choose a group.", "invalid": "Choose a group."})
    mode = forms.ChoiceField(label="Mode", choices=MODES, error_messages={"invalid_choice": "Choose a mode."})

    field_order = ["group", "mode", "message"]


class RenameForm(forms.Form):
    title = forms.CharField(label="Title", max_length=TITLE_MAX_LENGTH)


def first_error(form: forms.Form) -> tuple[str, str]:
    """(field, message) of the form's first error, for an answer in the API's error shape."""
    field, errors = next(iter(form.errors.items()))
    return field, errors[0]
