"""KiteMesh's ASGI application with one piece swapped for the plain alternative, for A/B runs
(`python bench/run.py --variants stock_handler,fifo_pool`): does the piece earn its place? ARCHITECTURE.md
keeps the answers. Each function is an application factory (`uvicorn --factory variants:<name>`), so each
variant is a worker of its own, swapped before its first request.

- `stock_handler`: the API served by Django's own ASGIHandler, through settings.MIDDLEWARE as the pages are,
  instead of kitemesh_site.asgi.ApiHandler;
- `fifo_pool`: the request path's database work on a ThreadPoolExecutor with as many threads, instead of
  core.db.LifoThreadPool."""

import functools
from concurrent.futures import ThreadPoolExecutor


def stock_handler():
    import kitemesh_site.asgi as site

    site.api_application = site.django_application
    return site.application


def fifo_pool():
    from django.conf import settings
    from django.db import DEFAULT_DB_ALIAS, connections

    import core.db
    import kitemesh_site.asgi as site

    @functools.cache
    def pool() -> ThreadPoolExecutor:
        sqlite = connections[DEFAULT_DB_ALIAS].vendor == "sqlite"
        return ThreadPoolExecutor(max_workers=1 if sqlite else max(settings.KITEMESH_DB_THREADS, 1))

    core.db._pool = pool
    return site.application
