from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"

    def ready(self) -> None:
        from core.vault import vault_key_check

        vault_key_check()  # a malformed KITEMESH_VAULT_KEY stops the process at start-up, clearly
        self._config_cache_invalidation()

    def _config_cache_invalidation(self) -> None:
        """Any change to what a run reads of its group clears this process's cache of it."""
        from django.db.models.signals import m2m_changed, post_delete, post_save

        from chat.selectors import config_cache_clear
        from core import models

        config = [
            models.Team,
            models.VaultSecret,
            models.CustomModel,
            models.Tool,
            models.Group,
            models.GroupAgent,
            models.GroupFallback,
            models.ApiToken,
        ]
        for model in config:
            post_save.connect(config_cache_clear, sender=model, dispatch_uid=f"config_cache_save_{model.__name__}")
            post_delete.connect(config_cache_clear, sender=model, dispatch_uid=f"config_cache_del_{model.__name__}")
        scopes = [models.Group.tools, models.ApiToken.groups, models.ApiToken.excluded_groups]
        scopes += [models.ApiToken.tools, models.ApiToken.excluded_tools]
        for scope in scopes:
            m2m_changed.connect(config_cache_clear, sender=scope.through, dispatch_uid=f"config_cache_{scope.through}")
