from django.apps import AppConfig
from django.db.models.signals import post_migrate


class CoreConfig(AppConfig):
    name = "core"
    label = "core"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from core.config_version import config_version_install

        post_migrate.connect(config_version_install, sender=self, dispatch_uid="kitemesh_config_triggers")
