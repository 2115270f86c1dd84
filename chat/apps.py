from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"

    def ready(self) -> None:
        from core.vault import vault_key_check

        vault_key_check()  # a malformed KITEMESH_VAULT_KEY stops the process at start-up, clearly
