"""API tokens: `km_` + 43 url-safe characters (256 random bits). The first characters are a lookup
prefix kept in clear; the whole token is stored as a SHA-256 hash and compared in constant time."""

import functools
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from chat.errors import AuthenticationError
from chat.selectors import team_cached, team_get
from core.models import ApiToken, Group, Team, Tool
from kitemesh_site.sql import db_value, sql_instances, sql_rows

TOKEN_PREFIX = "km_"
LOOKUP_PREFIX_LENGTH = 12  # "km_" + 9 random characters: unique enough to find the row, useless to guess


def token_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def token_secret_new() -> tuple[str, str, str]:
    """A new token: (the secret shown once, its lookup prefix, its hash)."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return raw, raw[:LOOKUP_PREFIX_LENGTH], token_hash(raw)


@transaction.atomic
def token_create(
    *,
    team: Team,
    name: str,
    groups: Iterable[Group] = (),
    tools: Iterable[Tool] = (),
    expires_at: datetime | None = None,
    requests_per_minute: int | None = None,
    concurrent_streams: int | None = None,
) -> tuple[ApiToken, str]:
    """Create a token and return it with its secret, which is never recoverable afterwards."""
    raw, prefix, secret_hash = token_secret_new()
    token = ApiToken.objects.create(
        team=team,
        name=name,
        prefix=prefix,
        secret_hash=secret_hash,
        expires_at=expires_at,
        requests_per_minute=requests_per_minute,
        concurrent_streams=concurrent_streams,
    )
    token.groups.set(groups)
    token.tools.set(tools)
    return token, raw


def token_expiry(seconds: int | None) -> datetime | None:
    return timezone.now() + timedelta(seconds=seconds) if seconds else None


def token_revoke(*, token: ApiToken) -> bool:
    """Revoke at once; returns False when it was already revoked."""
    return bool(ApiToken.objects.filter(pk=token.pk, revoked_at=None).update(revoked_at=timezone.now()))


# Tokens read from the database, by lookup prefix: (when read, its row, the token built from it). Every
# request but a completion's reads its token's row again (revocation and expiry apply at once); a
# completion may take a token read within KITEMESH_CONFIG_CACHE_SECONDS (token_recent), because the
# statement that starts its run checks the token is still live (token_live_query).
_tokens_read: dict[str, tuple[float, tuple, ApiToken]] = {}
_TOKENS_READ_MAX = 10_000
INVALID_TOKEN_MESSAGE = "Invalid, expired or revoked API token."


def token_authenticate(raw: str) -> ApiToken | None:
    """The live token for a bearer secret (with its team), or None."""
    if not raw.startswith(TOKEN_PREFIX) or len(raw) < LOOKUP_PREFIX_LENGTH + 8:
        return None
    token = _token_read(raw[:LOOKUP_PREFIX_LENGTH])
    if token is None or not _token_usable(token, raw):
        return None
    token.team = team_get(team_id=token.team_id)
    return token


def token_recent(raw: str) -> ApiToken | None:
    """token_authenticate's answer from this process's last read of the token, when that read is recent
    and the team is in the config cache: no database (callable from async code). None means "read it".
    Only for a request whose writes check the token again (token_live_query)."""
    read = _tokens_read.get(raw[:LOOKUP_PREFIX_LENGTH])
    if read is None or read[0] + settings.KITEMESH_CONFIG_CACHE_SECONDS < time.monotonic():
        return None
    token = read[2]
    if not _token_usable(token, raw) or (team := team_cached(team_id=token.team_id)) is None:
        return None
    token.team = team
    return token


def _token_usable(token: ApiToken, raw: str) -> bool:
    if not hmac.compare_digest(token.secret_hash, token_hash(raw)):
        return False
    return token.revoked_at is None and (token.expires_at is None or token.expires_at > timezone.now())


# A row when the token is live; its parameters from token_live_query.
_TOKEN_LIVE = (
    "SELECT id FROM chat_apitoken WHERE id = %s AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > %s)"
)


def token_live_query(token: ApiToken) -> tuple[str, list]:
    """A query that returns a row only while the token is neither revoked nor expired, to run inside a
    write that must not happen for a dead token."""
    return _TOKEN_LIVE, [token.pk, db_value(ApiToken, "expires_at", timezone.now())]


def token_live_check(token: ApiToken) -> None:
    """AuthenticationError unless the token is live: for a caller that may hold a token read a while ago."""
    if not sql_rows(*token_live_query(token)):
        raise AuthenticationError(INVALID_TOKEN_MESSAGE)


@functools.cache
def _token_row_statement() -> str:
    """Every column of the token, as the database returns them (compared with the last read, not converted)."""
    columns = ", ".join(f.column for f in ApiToken._meta.concrete_fields)
    return f"SELECT {columns} FROM chat_apitoken WHERE prefix = %s"


def _token_read(prefix: str) -> ApiToken | None:
    """The token's row, read by one written-out statement; the ApiToken is built only when the row is new
    to this process or has changed, since building it costs more than the read (README, Benchmarks).
    Requests share it read-only."""
    rows = sql_rows(_token_row_statement(), [prefix])
    if not rows:
        _tokens_read.pop(prefix, None)
        return None
    read = _tokens_read.get(prefix)
    if read is not None and read[1] == rows[0]:
        token = read[2]
    else:
        built = sql_instances(ApiToken, _token_row_statement(), [prefix])
        if not built:
            return None
        token = built[0]
        if len(_tokens_read) >= _TOKENS_READ_MAX:
            _tokens_read.clear()
    _tokens_read[prefix] = (time.monotonic(), rows[0], token)
    return token
