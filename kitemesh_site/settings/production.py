"""Production settings: every secret must come from the environment."""

import os

from django.core.exceptions import ImproperlyConfigured

from core.logs import logging_config

from .base import *  # noqa: F403
from .base import DEV_SECRET_KEY, DEV_VAULT_KEY, KITEMESH_LOG_LEVEL


def required_env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise ImproperlyConfigured(f"{name} must be set in production (see README, Deployment).")
    return value


DEBUG = False
SECRET_KEY = required_env("DJANGO_SECRET_KEY")
KITEMESH_VAULT_KEY = required_env("KITEMESH_VAULT_KEY")
ALLOWED_HOSTS = required_env("DJANGO_ALLOWED_HOSTS").split(",")
# The development keys are public (they are in this repository): production refuses them.
if SECRET_KEY == DEV_SECRET_KEY:
    raise ImproperlyConfigured("DJANGO_SECRET_KEY is the development key: set a secret one (README, Deployment).")
if DEV_VAULT_KEY in (key.strip() for key in KITEMESH_VAULT_KEY.split(",")):
    raise ImproperlyConfigured("KITEMESH_VAULT_KEY holds the development key: set a secret one (README, Deployment).")
# /metrics shows every team's credits: without KITEMESH_METRICS_TOKEN it is off (403).
KITEMESH_METRICS_OPEN_WITHOUT_TOKEN = False
# --- HTTPS (TLS ends at a reverse proxy that sets X-Forwarded-Proto) ------------------------------
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_SSL_REDIRECT = os.environ.get("DJANGO_SECURE_SSL_REDIRECT", "1") == "1"
# Load balancers probe these over plain HTTP.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_HSTS_SECONDS = int(os.environ.get("DJANGO_SECURE_HSTS_SECONDS", str(365 * 24 * 3600)))
# Turn these off (0) only when some subdomain is still served over plain HTTP.
SECURE_HSTS_INCLUDE_SUBDOMAINS = os.environ.get("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", "1") == "1"
SECURE_HSTS_PRELOAD = os.environ.get("DJANGO_SECURE_HSTS_PRELOAD", "1") == "1"
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",") if o]

# --- Logging: one JSON object a line for log shippers, unless KITEMESH_LOG_FORMAT=text ----------------
LOGGING = logging_config(log_format=os.environ.get("KITEMESH_LOG_FORMAT") or "json", level=KITEMESH_LOG_LEVEL)
