"""PLACEHOLDER (being written): the OpenAI surface."""

from __future__ import annotations

from fastapi import APIRouter

from k2serve.router.frontend import Frontend


def openai_routes(frontend: Frontend) -> APIRouter:
    return APIRouter()
