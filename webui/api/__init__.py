"""The A1111-compatible REST API (/sdapi/v1/*) and our per-job routes (/api/v1/jobs/*).

    attach_api(app, services)   add every route (and --api-auth) to an existing FastAPI app,
                                such as Gradio's, for `--api`
    create_api_app(services)    a FastAPI app with only the API, for `--nowebui` (run it with uvicorn)

Both also serve OpenAPI docs at /docs (schema at /api/v1/openapi.json, and at /openapi.json where the app has none
of its own), behind the same auth; /internal/ping alone needs none.
"""
from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi

from webui import __version__
from webui.api.auth import basic_auth
from webui.api.routes import build_open_router, build_router

__all__ = ["attach_api", "create_api_app"]

TITLE = "diffusers-webui API"
SCHEMA_PATH = "/api/v1/openapi.json"


def attach_api(app: FastAPI, services) -> None:
    """Add the API routes, their auth and their docs to `app` (safe to call on a running app)."""
    auth = basic_auth(services.settings.api_credentials)
    routers = [build_router(services, auth), build_open_router()]
    for router in routers:
        app.include_router(router)
    _add_docs(app, [route for router in routers for route in router.routes], auth)


def create_api_app(services) -> FastAPI:
    """A fresh FastAPI app serving only the API."""
    app = FastAPI(title=TITLE, version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    attach_api(app, services)
    return app


def _add_docs(app: FastAPI, routes: list, auth) -> None:
    """Serve a schema of the API routes only (not of the app they join) and a Swagger page for it."""
    dependencies = [Depends(auth)] if auth else []
    cache: dict[str, Any] = {}

    def openapi_schema() -> dict[str, Any]:
        if "schema" not in cache:
            cache["schema"] = get_openapi(title=TITLE, version=__version__, routes=routes,
                                          description="stable-diffusion-webui's /sdapi/v1 API on diffusers, "
                                                      "plus per-job routes under /api/v1/jobs.")
        return cache["schema"]

    def swagger_page():
        return get_swagger_ui_html(openapi_url=SCHEMA_PATH, title=f"{TITLE} docs")

    taken = {getattr(route, "path", None) for route in app.router.routes}
    # also at A1111's /openapi.json, where the app has none of its own (--nowebui): clients look for it there
    for path in (SCHEMA_PATH, *(["/openapi.json"] if "/openapi.json" not in taken else [])):
        app.add_api_route(path, openapi_schema, methods=["GET"], include_in_schema=False, dependencies=dependencies)
    if "/docs" not in taken:
        app.add_api_route("/docs", swagger_page, methods=["GET"], include_in_schema=False, dependencies=dependencies)
