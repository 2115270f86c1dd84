from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing.ledger import credits_grant
from core.errors import KiteMeshError
from core.models import Team


class Command(BaseCommand):
    help = "Grant credits to a team (a ledger entry of kind 'grant')."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--team", required=True)
        parser.add_argument("--amount", type=int, required=True)
        parser.add_argument("--reason", default="granted from the command line")

    def handle(self, *args, team: str, amount: int, reason: str, **options) -> None:
        team_obj = Team.objects.filter(name=team).first()
        if team_obj is None:
            raise CommandError(f"No team named {team!r}")
        try:
            entry = credits_grant(team=team_obj, amount=amount, reason=reason)
        except KiteMeshError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(f"granted {amount} credits to {team}; balance {entry.balance_after}")
