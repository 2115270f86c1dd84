"""The production settings: secrets are required, and Django's deployment checks pass clean."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from kitemesh_site.settings.base import DEV_SECRET_KEY, DEV_VAULT_KEY

ROOT = Path(__file__).resolve().parents[2]


def _production_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "KITEMESH_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="kitemesh_site.settings.production",
        DJANGO_SECRET_KEY="x" * 20 + "production-secret-key-with-enough-entropy-0123456789",
        KITEMESH_VAULT_KEY=Fernet.generate_key().decode(),
        DJANGO_ALLOWED_HOSTS="gateway.example.com",
    )
    env.update(overrides)
    return env


def _manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_deployment_checks_pass_with_no_warning():
    result = _manage("check", "--deploy", "--fail-level", "WARNING", env=_production_env())

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_refuses_to_start_without_a_secret_key():
    env = _production_env()
    del env["DJANGO_SECRET_KEY"]

    result = _manage("check", env=env)

    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set in production" in result.stderr


def _postgres_options(**overrides: str) -> str:
    env = _production_env(DATABASE_URL="postgres://kitemesh@db.internal:5432/kitemesh", **overrides)
    script = "from django.conf import settings; print(settings.DATABASES['default']['OPTIONS'])"
    result = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {script}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_postgresql_prepares_statements_unless_turned_off_for_a_pooler():
    assert "'server_side_binding': True, 'prepare_threshold': 5" in _postgres_options()
    options = _postgres_options(DATABASE_SERVER_SIDE_BINDING="0")
    assert "server_side_binding" not in options and "prepare_threshold" not in options


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DJANGO_SECRET_KEY", DEV_SECRET_KEY, "DJANGO_SECRET_KEY is the development key"),
        ("KITEMESH_VAULT_KEY", DEV_VAULT_KEY, "KITEMESH_VAULT_KEY holds the development key"),
        ("KITEMESH_VAULT_KEY", f"{Fernet.generate_key().decode()},{DEV_VAULT_KEY}", "holds the development key"),
    ],
)
def test_production_refuses_to_start_with_a_development_key(variable, value, message):
    result = _manage("check", env=_production_env(**{variable: value}))

    assert result.returncode != 0
    assert message in result.stderr
    assert value not in result.stderr  # the key itself is never printed


def test_every_deployment_entry_point_starts_with_the_production_settings():
    procfile = (ROOT / "Procfile").read_text().splitlines()
    assert {line.split(":")[0] for line in procfile} == {"release", "web", "worker"}
    assert all("DJANGO_SETTINGS_MODULE=kitemesh_site.settings.production" in line for line in procfile)
    units = sorted((ROOT / "deploy").glob("*.service"))
    assert [unit.name for unit in units] == ["kitemesh-worker.service", "kitemesh.service"]
    for unit in units:
        assert "Environment=DJANGO_SETTINGS_MODULE=kitemesh_site.settings.production" in unit.read_text()


def test_production_metrics_are_off_without_a_token_and_served_with_it(tmp_path):
    script = (
        "import django; django.setup(); from django.test import Client; c = Client(); "
        "r = c.get('/metrics', HTTP_HOST='gateway.example.com', secure=True); print(r.status_code); "
        "r = c.get('/metrics', HTTP_HOST='gateway.example.com', secure=True, "
        "HTTP_AUTHORIZATION='Bearer scrape-me'); print(r.status_code)"
    )

    def statuses(**env: str) -> list[str]:
        database = f"sqlite:///{tmp_path / 'metrics.sqlite3'}"
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env=_production_env(DATABASE_URL=database, **env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert statuses() == ["403", "403"]
    assert statuses(KITEMESH_METRICS_TOKEN="scrape-me") == ["401", "200"]
