"""The router's REST app: OpenAI- and Anthropic-compatible routes on one port, behind ``HttpGuard``.

Lifecycle: ``build_app(frontend, keys, ...)`` once per router process; the server runs it under
uvicorn on the configured interface. It mounts
- the OpenAI surface (``openai_routes``): ``/v1/chat/completions``, ``/v1/completions``,
  ``/v1/models``, ``/tokenize``, ``/detokenize``;
- the Anthropic surface (``anthropic_routes``): ``/v1/messages``, ``/v1/messages/count_tokens``;
- ``GET /health`` (200 while the router admits requests and a worker is live, else 503),
  ``GET /metrics`` (Prometheus text of ``frontend.metrics``; public by default) and
  ``GET /metrics/targets`` (Prometheus HTTP service discovery of the workers' and the controller's
  ``/metrics``; behind the key, it names internal addresses).
The outermost layer, ``HttpCounter``, counts every answer (route template, method, status).
Every failure leaves through one exception handler: ``ApiError`` -> its status and the surface's
body (Anthropic's shape under ``/v1/messages``), FastAPI's validation errors -> 400, anything else
-> 500 with a generic message (no exception text reaches a client). ``/docs`` and the OpenAPI
document stay behind the key like every other route.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from k2serve.router.anthropic_routes import anthropic_routes
from k2serve.router.api_error import ApiError, ErrorKind
from k2serve.router.api_keys import ApiKeys
from k2serve.router.frontend import Frontend
from k2serve.router.http_counter import HttpCounter
from k2serve.router.http_guard import DEFAULT_MAX_BODY_BYTES, DEFAULT_PUBLIC_PATHS, HttpGuard, is_anthropic_path
from k2serve.router.openai_routes import openai_routes
from k2serve.router.openai_schemas import STRING, integer

logger = logging.getLogger(__name__)

_HEALTH = {"type": "object", "required": ["status"], "properties": {"status": STRING, "workers": integer(0)}}
HEALTH_RESPONSES: dict[int | str, Any] = {
    200: {"description": "admitting, a worker is live", "content": {"application/json": {"schema": _HEALTH}}},
    503: {"description": "draining, or no live worker", "content": {"application/json": {"schema": _HEALTH}}},
}
METRICS_RESPONSES: dict[int | str, Any] = {
    200: {"description": "Prometheus text format", "content": {CONTENT_TYPE_LATEST: {"schema": STRING}}}
}
_TARGET_GROUP = {
    "type": "object",
    "required": ["targets", "labels"],
    "properties": {"targets": {"type": "array", "items": STRING}, "labels": {"type": "object"}},
}
TARGETS_RESPONSES: dict[int | str, Any] = {
    200: {
        "description": "Prometheus HTTP service discovery",
        "content": {"application/json": {"schema": {"type": "array", "items": _TARGET_GROUP}}},
    }
}


def error_response(request: Request, error: ApiError) -> JSONResponse:
    if is_anthropic_path(request.url.path):
        body, status = error.anthropic_body(request.headers.get("x-request-id")), error.kind.anthropic_status
    else:
        body, status = error.openai_body(), error.kind.http_status
    return JSONResponse(body, status_code=status, headers=error.headers())


def build_app(
    frontend: Frontend,
    keys: ApiKeys | None = None,
    *,
    public_paths: tuple[str, ...] = DEFAULT_PUBLIC_PATHS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> HttpCounter:
    app = FastAPI(title="k2serve", version="0.1.0")
    registry = frontend.metrics.registry

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problem: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in problem.get("loc", ()) if p != "body") or "body"
        message = str(problem.get("msg", "invalid request"))[:200]
        return error_response(request, ApiError(ErrorKind.INVALID, f"{param}: {message}", param=param))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(request, ApiError(ErrorKind.INTERNAL, "internal error (logged on the server)"))

    @app.get("/health", responses=HEALTH_RESPONSES)
    async def health() -> Response:
        if frontend.admission.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        workers = len(frontend.dispatcher.endpoints)
        if not workers:
            return JSONResponse({"status": "no live worker"}, status_code=503)
        return JSONResponse({"status": "ok", "workers": workers})

    @app.get("/metrics", responses=METRICS_RESPONSES)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics/targets", responses=TARGETS_RESPONSES)
    async def scrape_targets() -> JSONResponse:
        return JSONResponse(frontend.scrape_targets.http_sd())

    app.include_router(openai_routes(frontend))
    app.include_router(anthropic_routes(frontend))
    guarded = HttpGuard(app, keys or ApiKeys(), public_paths=public_paths, max_body_bytes=max_body_bytes)
    own = [path for route in app.routes if isinstance(path := getattr(route, "path", None), str)]
    routes = {*own, *app.openapi()["paths"]}  # included routers hide their routes from app.routes
    return HttpCounter(guarded, frontend.metrics.http_requests, routes)
