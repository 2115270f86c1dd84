from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat.services.config import ConfigError, config_apply


class Command(BaseCommand):
    help = "Apply a KiteMesh YAML config file idempotently (teams, secrets, models, tools, groups)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path)

    def handle(self, *args, file: Path, **options) -> None:
        try:
            result = config_apply(file)
        except ConfigError as exc:
            raise CommandError(str(exc)) from exc
        for outcome in ("created", "updated"):
            for label in getattr(result, outcome):
                self.stdout.write(f"{outcome}: {label}")
        self.stdout.write(
            f"{len(result.created)} created, {len(result.updated)} updated, {len(result.unchanged)} unchanged"
        )
