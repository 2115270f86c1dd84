"""Who calls: an API client by its token, or a person chatting in the browser (/chat/) as a member of one of
their teams. Every run, resume and rate limit knows its caller; an execution records it (a token or a user)."""

from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser

from core.models import ApiToken, Team


@dataclass(frozen=True)
class Caller:
    """Who calls, in `team`, read at configuration version `version`: `token` for an API client (its scope
    limits the groups and tools), or `user` for a member (every group and tool of the team). Not
    `confirmed` when the token came from what a worker keeps, without a query (chat.services.tokens
    token_recent): only a request whose write checks that version may act on it."""

    team: Team
    version: int
    token: ApiToken | None = None
    user: AbstractBaseUser | None = None
    confirmed: bool = True

    @property
    def token_id(self) -> int | None:
        return self.token.pk if self.token is not None else None

    @property
    def scope_key(self) -> str:
        """What the groups it may run depend on: its token's scope, or (a member) the team's."""
        return f"token:{self.token.pk}" if self.token is not None else f"team:{self.team.pk}"

    @property
    def label(self) -> str:
        """Who it is, as a decision or a log records it: `token:<name>`, or the person's username."""
        return f"token:{self.token.name}" if self.token is not None else self.user.get_username()
