import uuid

from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat.services.tokens import token_create, token_expiry
from core.models import ApiToken, Group, Team, Tool


class Command(BaseCommand):
    help = "Create an API token; prints the secret (km_…) alone on the last line. It is not shown again."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--team", required=True)
        parser.add_argument("--name", required=True)
        parser.add_argument("--group", action="append", default=[], help="Group UUID (repeat); default: all")
        parser.add_argument("--tool", action="append", default=[], help="Tool name (repeat); default: all")
        parser.add_argument("--expires-in", type=int, help="Seconds until the token expires")
        parser.add_argument("--requests-per-minute", type=int, help="Rate limit for this token")
        parser.add_argument("--concurrent-streams", type=int, help="Open streams allowed at once")
        parser.add_argument("--credit-limit", type=int, help="Credits its runs may spend (and hold) per period")
        parser.add_argument(
            "--credit-period",
            choices=[p.value for p in ApiToken.CreditPeriod],
            default="total",
            help="day, month or total",
        )

    def handle(self, *args, team: str, name: str, group: list, tool: list, expires_in: int | None, **o) -> None:
        limits = {k: o.get(k) for k in ("requests_per_minute", "concurrent_streams")}
        if any(v is not None and v <= 0 for v in limits.values()):
            raise CommandError("--requests-per-minute and --concurrent-streams must be positive")
        team_obj = Team.objects.filter(name=team).first()
        if team_obj is None:
            raise CommandError(f"No team named {team!r}")
        groups = []
        for value in group:
            try:
                groups.append(Group.objects.get(pk=uuid.UUID(value), team=team_obj))
            except (ValueError, Group.DoesNotExist) as exc:
                raise CommandError(f"--group {value}: no such group in team {team!r}") from exc
        tools = []
        for value in tool:
            found = Tool.objects.filter(team=team_obj, name=value).first()
            if found is None:
                raise CommandError(f"--tool {value}: no such tool in team {team!r}")
            tools.append(found)
        credit = {"credit_limit": o.get("credit_limit"), "credit_period": o.get("credit_period") or "total"}
        if credit["credit_limit"] is not None and credit["credit_limit"] < 0:
            raise CommandError("--credit-limit must be 0 or more credits")
        if expires_in is not None and expires_in <= 0:
            raise CommandError("--expires-in must be a positive number of seconds")
        if team_obj.api_tokens.filter(name=name, revoked_at=None).exists():
            raise CommandError(f"Team {team!r} already has an active token named {name!r}")
        token, raw = token_create(
            team=team_obj,
            name=name,
            groups=groups,
            tools=tools,
            expires_at=token_expiry(expires_in),
            **limits,
            **credit,
        )
        self.stderr.write(f"Token {token.name!r} for team {team!r} (shown once, store it now):")
        self.stdout.write(raw)
