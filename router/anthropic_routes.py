"""PLACEHOLDER (being written): the Anthropic surface."""

from __future__ import annotations

from fastapi import APIRouter

from k2serve.router.frontend import Frontend


def anthropic_routes(frontend: Frontend) -> APIRouter:
    return APIRouter()
