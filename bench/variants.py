"""KiteMesh's ASGI application with one piece swapped for the plain alternative, for A/B runs
(`python bench/run.py --variants stock_handler`): does the piece earn its place? ARCHITECTURE.md
keeps the answers. Each function is an application factory (`uvicorn --factory variants:<name>`), so each
variant is a worker of its own, swapped before its first request.

- `stock_handler`: the API served by Django's own ASGIHandler, through settings.MIDDLEWARE as the pages are,
  instead of kitemesh_site.asgi.ApiHandler.

Answered and gone: `fifo_pool` (a ThreadPoolExecutor instead of a hand-written pool whose most recently idle
thread took the next job) measured +0.05 ms at c=1 and 0.95× at c=16, so the ThreadPoolExecutor is now
production's (core/db.py)."""


def stock_handler():
    import kitemesh_site.asgi as site

    site.api_application = site.django_application
    return site.application
