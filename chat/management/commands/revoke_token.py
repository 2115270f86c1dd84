from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat.services.tokens import token_revoke
from core.models import ApiToken


class Command(BaseCommand):
    help = "Revoke a team's active API token by name; it stops working at once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--team", required=True)
        parser.add_argument("--name", required=True)

    def handle(self, *args, team: str, name: str, **options) -> None:
        token = ApiToken.objects.filter(team__name=team, name=name, revoked_at=None).first()
        if token is None or not token_revoke(token=token):
            raise CommandError(f"No active token named {name!r} in team {team!r}")
        self.stdout.write(f"revoked: {team}/{name}")
