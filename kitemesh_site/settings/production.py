"""Production settings: every secret must come from the environment."""

import os

from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F403


def required_env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise ImproperlyConfigured(f"{name} must be set in production (see README, Deployment).")
    return value


DEBUG = False
SECRET_KEY = required_env("DJANGO_SECRET_KEY")
KITEMESH_VAULT_KEY = required_env("KITEMESH_VAULT_KEY")
ALLOWED_HOSTS = required_env("DJANGO_ALLOWED_HOSTS").split(",")
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
