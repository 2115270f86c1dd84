"""Logs: one JSON object a line (KITEMESH_LOG_FORMAT=json, production's default) for log shippers, or plain
text for a terminal (`make run`). Every line written while a request is served carries its request id.
Imported by the settings: nothing here may need Django."""

import json
import logging
import re
from contextvars import ContextVar
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")
REDACTED = "[redacted]"

# The id of the API request served in this context (its X-Request-ID), set by core.middleware.
# A context variable, not a thread-local: async views, their streams and sync_to_async threads all see it.
request_id_var: ContextVar[str | None] = ContextVar("kitemesh_request_id", default=None)

# Code never logs credentials on purpose; this catches a message or traceback that quotes one anyway
# (an exception carrying a header, an upstream echoing a request): KiteMesh tokens, and any Bearer value.
_CREDENTIALS = re.compile(r"\bkm_[A-Za-z0-9_-]{8,}|(?<=Bearer )[^\s\"',;]+", re.IGNORECASE)


def redact(text: str) -> str:
    return _CREDENTIALS.sub(REDACTED, text)


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", "request_id"?, "exc_info"?, "stack_info"?}`, one a line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        # A caller may name the request itself (extra={"request_id": …}), e.g. outside the request's context.
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc_info"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack_info"] = redact(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


def logging_config(*, log_format: str, level: str) -> dict:
    """Django's LOGGING for `log_format` (text or json): everything to stderr at `level`, httpx quiet."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"KITEMESH_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}.")
    console = {"class": "logging.StreamHandler"}
    loggers: dict[str, dict] = {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}}
    if log_format == "json":
        console["formatter"] = "json"
        # uvicorn's lines (start-up, errors, access log) would go out as text through its own handlers: send
        # them through ours. Only these leaves: configuring their parent "uvicorn" would reset the levels
        # that uvicorn's --log-level gave them.
        loggers |= {name: {"handlers": ["console"], "propagate": False} for name in ("uvicorn.error", "uvicorn.access")}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"console": console},
        "root": {"handlers": ["console"], "level": level},
        "loggers": loggers,
    }
