"""The tokenizer utilities and the model card of the OpenAI surface: ``/tokenize``, ``/detokenize``,
``/v1/models`` (§1.6), as pure functions of a parsed body.

Lifecycle: per request, the route reads the body and calls one of these; they only use the
frontend's tokenizer, chat template and served-model facts (no worker is involved).
- ``tokenize``: ``{prompt}`` (text) or ``{messages, tools, add_generation_prompt}`` (the chat
  template, as a chat request would render it) -> ``{count, max_model_len, tokens, token_strs}``;
- ``detokenize``: ``{tokens}`` -> ``{prompt}``; an id outside the vocabulary is a 400;
- ``model_list``: the one served model, ``created`` being when the routes were built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from k2serve.router.api_error import invalid
from k2serve.router.chat_template import ChatInputError, ChatTemplateError
from k2serve.router.frontend import Frontend
from k2serve.router.openai_fields import WireBody


def tokenize(frontend: Frontend, raw: Mapping[str, Any]) -> dict[str, Any]:
    body = WireBody(raw)
    frontend.check_model(body.string("model"))
    if body.has("messages"):
        ids = _chat_ids(frontend, body)
    else:
        prompt = body.string("prompt")
        if prompt is None:
            raise invalid("prompt", "is required (or `messages`)")
        ids = frontend.encode(prompt)
    strs = [frontend.tokenizer.id_to_token(i) for i in ids] if body.boolean("return_token_strs") else None
    return {"count": len(ids), "max_model_len": frontend.model.max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(frontend: Frontend, raw: Mapping[str, Any]) -> dict[str, Any]:
    body = WireBody(raw)
    frontend.check_model(body.string("model"))
    ids = body.token_ids("tokens")
    if ids is None:
        raise invalid("tokens", "is required")
    vocab = frontend.tokenizer.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise invalid("tokens", f"token ids must be in [0, {vocab}); got {bad[:4]}")
    return {"prompt": frontend.tokenizer.decode(ids)}


def model_list(frontend: Frontend, created: int) -> dict[str, Any]:
    model = frontend.model
    card = {
        "id": model.name,
        "object": "model",
        "created": created,
        "owned_by": "k2serve",
        "root": model.root,
        "parent": None,
        "max_model_len": model.max_model_len,
    }
    return {"object": "list", "data": [card]}


def _chat_ids(frontend: Frontend, body: WireBody) -> list[int]:
    tools = body.array("tools") or None
    try:
        text = frontend.template.render(
            body.raw("messages"), tools=tools, add_generation_prompt=body.boolean("add_generation_prompt", True)
        )
    except ChatInputError as exc:
        raise invalid(exc.field, exc.reason) from None
    except ChatTemplateError as exc:
        raise invalid("messages", f"the chat template rejected the conversation: {exc}") from None
    return frontend.encode(text)
