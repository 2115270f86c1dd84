"""Model fields kept encrypted at rest with the vault key (core.vault): in Python they hold the clear
value, in the database a Fernet token. For what a run keeps that a database dump must not show (tool
arguments, the conversation of a paused run)."""

import json
from typing import Any

from django.db import models

from core.vault import decrypt, encrypt


class EncryptedTextField(models.TextField):
    def get_prep_value(self, value: Any) -> str | None:
        value = super().get_prep_value(value)
        return None if value is None else encrypt(value).decode("ascii")

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> str | None:
        return None if value is None else decrypt(value.encode("ascii"), what=f"{self.model.__name__}.{self.name}")


class EncryptedJSONField(models.TextField):
    """A JSON value (dicts, lists, strings, numbers), encrypted whole."""

    def get_prep_value(self, value: Any) -> str | None:
        return None if value is None else encrypt(json.dumps(value)).decode("ascii")

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> Any:
        if value is None:
            return None
        return json.loads(decrypt(value.encode("ascii"), what=f"{self.model.__name__}.{self.name}"))

    def to_python(self, value: Any) -> Any:
        return value
