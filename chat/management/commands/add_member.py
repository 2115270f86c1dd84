from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat.services.members import member_add
from core.models import Team


class Command(BaseCommand):
    help = (
        "Make a user (created when missing) a member of a team, who can then chat with its groups on /chat/;"
        " --approver lets them decide its approvals. Prints a new user's password alone on its last line."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--team", required=True)
        parser.add_argument("--username", required=True)
        parser.add_argument("--approver", action="store_true", help="May decide the team's approvals.")
        parser.add_argument("--new-password", action="store_true", help="Set (and print) a new password.")

    def handle(self, *args, team: str, username: str, approver: bool, new_password: bool, **options) -> None:
        team_obj = Team.objects.filter(name=team).first()
        if team_obj is None:
            raise CommandError(f"No team named {team!r}")
        password = member_add(team=team_obj, username=username, approver=approver, new_password=new_password)
        self.stdout.write(f"{username} is a member of {team}{' and an approver' if approver else ''}")
        if password is not None:
            self.stdout.write(password)
