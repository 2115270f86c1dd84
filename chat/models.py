"""Conversations (SPEC §8): a team member's chats with the team's groups in the browser. Each user turn is
a message; each assistant turn links the execution that answered it, which is billed to the team and
records the user as its caller."""

import uuid

from django.conf import settings
from django.db import models

from core.fields import EncryptedTextField
from core.models import Execution, Group, Mode, Team


class Conversation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="conversations")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    group = models.ForeignKey(Group, null=True, on_delete=models.SET_NULL, related_name="conversations")
    mode = models.CharField(max_length=16, choices=Mode.choices, blank=True, help_text="Blank: the group's.")
    title = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True, help_text="Its last message: the list's order.")

    class Meta:
        ordering = ["-updated_at", "-created_at"]
        indexes = [models.Index(fields=["user", "-updated_at"], name="conversation_user_recent")]

    def __str__(self) -> str:
        return self.title


class ConversationMessage(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=10, choices=Role.choices)
    content = EncryptedTextField(help_text="What was said (encrypted at rest).")
    execution = models.ForeignKey(
        Execution, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", help_text="What answered."
    )
    error = models.CharField(max_length=500, blank=True, help_text="Why the turn ended without its answer.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.role} in {self.conversation_id}"
