"""``GET /v1/turboquant/stats``: a JSON summary of the KV cache on the API server's port.

The numbers are read back from the same Prometheus registry ``/metrics`` serves (the
multiprocess collector under ``--api-server-count N``), so JSON and ``/metrics`` agree and
every API-server process answers with the merged view. See ``metrics.summarize``.

How the route gets onto vLLM's FastAPI app:

- Default, zero-config: :func:`install_stats_route` (the one patch, listed below), called
  by our stat logger in each API-server process before vLLM builds its app.
- Without the patch (``VLLM_TURBOQUANT_STATS_ROUTE=0``): vLLM's own ``--middleware`` flag
  (0.25 and 0.32), ``--middleware vllm_turboquant.stats_api.TurboQuantStatsMiddleware``.
- Not used: vLLM 0.32's endpoint plugins (group ``vllm.endpoint_plugins``). They load only
  when VLLM_PLUGINS names them, 0.25 lacks them, and a registered but not allowlisted one
  logs a warning at every start saying its routes are missing.

Patch (the only one in the metrics layer):
    What: wrap ``build_app`` in the module that builds the API server's app
        (0.32: ``vllm.entrypoints.launchers.api_server.entry``; 0.25:
        ``vllm.entrypoints.openai.api_server``) to add this route to the built app.
    Why: vLLM 0.25 (the GPU version we support) has no route hook without a CLI flag, and
        0.32's hook is off unless VLLM_PLUGINS is set.
    How: idempotent (a marker attribute); adds nothing when the app already has a route
        with this path; only touches modules already imported (the running server's own);
        off with ``VLLM_TURBOQUANT_STATS_ROUTE=0``.
    Removal: when the oldest supported vLLM has a route hook that is on by default (0.32's
        endpoint plugins are not), register there and drop this.
"""

from __future__ import annotations

import functools
import os
import sys

STATS_PATH = "/v1/turboquant/stats"
ROUTE_ENV = "VLLM_TURBOQUANT_STATS_ROUTE"

# Modules whose global ``build_app`` the API server calls, per vLLM version.
_SERVER_MODULES = (
    "vllm.entrypoints.launchers.api_server.entry",  # 0.32: build_and_serve()
    "vllm.entrypoints.openai.api_server",  # 0.25: build_and_serve() in the same module
)


def _snapshot() -> dict:
    from .metrics import stats_snapshot
    return stats_snapshot()


async def turboquant_stats():
    """GET /v1/turboquant/stats -> the JSON of ``metrics.summarize``."""
    from fastapi.responses import JSONResponse
    return JSONResponse(_snapshot())


def add_stats_route(app) -> bool:
    """Add the route to a FastAPI `app` unless one with this path exists. True if added."""
    if any(getattr(route, "path", None) == STATS_PATH for route in app.routes):
        return False
    app.add_api_route(STATS_PATH, turboquant_stats, methods=["GET"],
                      summary="TurboQuant KV-cache summary (bytes, capacity, savings)")
    return True


class TurboQuantStatsMiddleware:
    """ASGI middleware answering GET /v1/turboquant/stats; for vLLM's ``--middleware``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http" and scope.get("path") == STATS_PATH \
                and scope.get("method") in ("GET", "HEAD"):
            from fastapi.responses import JSONResponse
            await JSONResponse(_snapshot())(scope, receive, send)
            return
        await self.app(scope, receive, send)


def install_stats_route() -> list[str]:
    """Wrap the API server's ``build_app`` so the app it builds has our route (the patch
    described in the module docstring). Returns the modules patched by this call."""
    if os.environ.get(ROUTE_ENV, "1") == "0":
        return []
    patched = []
    for name in _SERVER_MODULES:
        module = sys.modules.get(name)
        build = getattr(module, "build_app", None)
        if build is None or getattr(build, "_turboquant_stats_route", False):
            continue
        module.build_app = _with_stats_route(build)
        patched.append(name)
    return patched


def _with_stats_route(build):
    @functools.wraps(build)
    def build_app(*args, **kwargs):
        app = build(*args, **kwargs)
        add_stats_route(app)
        return app

    build_app._turboquant_stats_route = True
    return build_app
