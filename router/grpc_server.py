"""``Serving``: the router's public gRPC service (``k2serve.v1.Serving``) over the ``Frontend``.

Lifecycle: ``add_serving(server, frontend, keys)`` registers one ``Serving`` on the router's
``grpc.aio`` server (``RouterServer`` also installs ``auth_interceptor(keys)``, health and
reflection). Per streaming call (Generate, Chat):
1. the request is checked and built (``grpc_messages``; the tenant from the key in the metadata is
   the cache salt, the client's deadline becomes ``deadline_s`` so every worker call carries it),
   then ``frontend.start`` admits it and waits for the first token. Every failure up to here is
   the status of the call (``ApiError.kind.grpc_code``; ``retry-after`` trailing metadata when
   the error has one);
2. initial metadata ``x-k2serve-id`` (the server's id, also every message's ``id``) and
   ``x-request-id`` (the client's ``request_id``, else its ``x-request-id`` metadata, when given;
   also in the trailing metadata of an error), then the events as messages (``grpc_responses``);
   the last message carries the usage;
3. a choice that fails after the stream began sends its final message (``finish_reason``
   "error", ``error`` the reason), then the call ends with UNAVAILABLE and that reason (proto:
   "an error after the stream began arrives as the status of the stream");
4. ``finally`` the ``GenerationStream`` is closed, whatever ended the call: a client that cancels
   or whose deadline passes cancels the handler (the client sees CANCELLED / DEADLINE_EXCEEDED),
   and closing the stream aborts the request on every worker that holds it.
``Abort(id)`` ends a running call of this service with status CANCELLED ("aborted by an Abort
call"; the messages already sent stay valid) and aborts the request on the workers; only the
tenant that started a call may abort it (another tenant gets ``found: false``); an id of a
request started elsewhere (REST) is passed to ``frontend.abort``. An unexpected exception before
the first message is logged and answered INTERNAL without details. Handlers write with
``context.write`` (not an async generator), so a cancellation always lands in this module's code
and the stream is closed at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import grpc

from k2serve.proto import serving_pb2, serving_pb2_grpc
from k2serve.proto.cluster_token import metadata_dict
from k2serve.router.api_error import ApiError, ErrorKind, invalid
from k2serve.router.api_keys import ApiKeys
from k2serve.router.chat_request import chat_generation, resolve_tool_choice
from k2serve.router.frontend import Frontend
from k2serve.router.generation_event import ChoiceFinished, GenerationEvent
from k2serve.router.generation_request import GenerationRequest, Routing
from k2serve.router.grpc_auth import UNAUTHENTICATED_MESSAGE, auth_interceptor
from k2serve.router.grpc_messages import (
    chat_messages,
    chat_tools,
    client_request_id,
    request_sampling,
    text,
    thinking,
    tool_choice,
)
from k2serve.router.grpc_responses import chat_responses, generate_responses
from k2serve.router.sampling_check import check_min_tokens

__all__ = ["Serving", "add_serving", "auth_interceptor"]

REQUEST_ID_KEY = "x-request-id"
SERVER_ID_KEY = "x-k2serve-id"

Render = Callable[[str, GenerationEvent], Sequence[Any]]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Call:
    """A running streaming call: its handler task and the tenant that started it."""

    handler: asyncio.Task[Any]
    tenant: str


def add_serving(server: grpc.aio.Server, frontend: Frontend, keys: ApiKeys | None = None) -> Serving:
    servicer = Serving(frontend, keys or ApiKeys())
    serving_pb2_grpc.add_ServingServicer_to_server(servicer, server)
    return servicer


class Serving(serving_pb2_grpc.ServingServicer):
    def __init__(self, frontend: Frontend, keys: ApiKeys) -> None:
        self.frontend, self.keys = frontend, keys
        self._calls: dict[str, _Call] = {}  # server id -> the handler streaming it
        self._aborted: set[str] = set()  # ids whose handler Abort cancelled

    # -- RPCs -------------------------------------------------------------------------------------

    async def Generate(self, request: serving_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        await self._stream(
            context, request.request_id, lambda: self._generate_request(request, context), generate_responses
        )

    async def Chat(self, request: serving_pb2.ChatRequest, context: grpc.aio.ServicerContext) -> None:
        await self._stream(context, request.request_id, lambda: self._chat_request(request, context), chat_responses)

    async def Abort(
        self, request: serving_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> serving_pb2.AbortResponse:
        call = self._calls.get(request.id)
        if call is not None:
            if call.tenant != self._tenant(context):
                return serving_pb2.AbortResponse(found=False)  # another tenant's request
            self._aborted.add(request.id)
            call.handler.cancel()
        found = await self.frontend.abort(request.id)  # closes the stream: the workers' calls end
        return serving_pb2.AbortResponse(found=found or call is not None)

    async def ListModels(
        self, request: serving_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> serving_pb2.ListModelsResponse:
        model = self.frontend.model
        info = serving_pb2.ModelInfo(id=model.name, max_model_len=model.max_model_len, root=model.root)
        return serving_pb2.ListModelsResponse(models=[info])

    async def Tokenize(
        self, request: serving_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> serving_pb2.TokenizeResponse:
        try:
            ids = self._tokenize(request)
        except ApiError as error:
            await _fail(context, error)
        except Exception:
            logger.exception("Tokenize failed")
            await _fail(context, _internal_error())
        return serving_pb2.TokenizeResponse(
            token_ids=ids, count=len(ids), max_model_len=self.frontend.model.max_model_len
        )

    # -- one streaming call -----------------------------------------------------------------------

    async def _stream(
        self,
        context: grpc.aio.ServicerContext,
        raw_client_id: str,
        build: Callable[[], GenerationRequest],
        render: Render,
    ) -> None:
        client_id = ""
        try:
            metadata = metadata_dict(context.invocation_metadata())
            client_id = client_request_id(raw_client_id or metadata.get(REQUEST_ID_KEY, ""))
            request = build()
            stream = await self.frontend.start(request)  # closes itself when it raises
        except ApiError as error:
            await _fail(context, error, client_id)
        except Exception:
            logger.exception("a gRPC request failed before it started")
            await _fail(context, _internal_error(), client_id)
        request_id, handler = request.request_id, asyncio.current_task()
        if handler is not None:
            self._calls[request_id] = _Call(handler, request.routing.cache_salt or "")
        try:
            await context.send_initial_metadata(_id_metadata(client_id, request_id))
            async for event in stream:
                for message in render(request_id, event):
                    await context.write(message)
                if isinstance(event, ChoiceFinished) and event.finish_reason == "error":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"choice {event.index} failed: {event.error}")
        except asyncio.CancelledError:
            if request_id not in self._aborted or handler is None:
                raise  # the client cancelled or its deadline passed
            handler.uncancel()
            await context.abort(grpc.StatusCode.CANCELLED, f"the request {request_id} was aborted by an Abort call")
        finally:
            self._calls.pop(request_id, None)
            self._aborted.discard(request_id)
            await stream.aclose()  # shielded inside: a second cancel cannot skip the slot's release

    # -- wire request -> GenerationRequest --------------------------------------------------------

    def _generate_request(
        self, request: serving_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> GenerationRequest:
        f = self.frontend
        f.check_model(request.model)
        checked = request_sampling(request.sampling, f.limits, f.tokenizer.vocab_size)
        if checked.sampling.max_reasoning_tokens is not None:
            raise invalid("sampling.max_reasoning_tokens", "applies to Chat only")
        which = request.WhichOneof("prompt")
        if which == "text":
            prompt = f.encode(text(request.text, "text"))
        elif which == "token_ids":
            prompt = list(request.token_ids.ids)
        else:
            raise invalid("prompt", "one of `text` or `token_ids` is required")
        max_tokens = f.check_prompt(prompt, checked.sampling.max_tokens, param=which)
        sampling = replace(checked.sampling, max_tokens=max_tokens)
        check_min_tokens(sampling, "sampling.min_tokens")
        return GenerationRequest(
            request_id=f.new_request_id("gen"),
            prompt_token_ids=tuple(prompt),
            sampling=sampling,
            n=checked.n,
            stop=checked.stop,
            skip_special_tokens=request.skip_special_tokens,
            chat=None,
            routing=self._routing(context, request.session_id),
            deadline_s=context.time_remaining(),
        )

    def _chat_request(self, request: serving_pb2.ChatRequest, context: grpc.aio.ServicerContext) -> GenerationRequest:
        f = self.frontend
        f.check_model(request.model)
        checked = request_sampling(request.sampling, f.limits, f.tokenizer.vocab_size)
        if checked.sampling.top_logprobs is not None:
            raise invalid("sampling.top_logprobs", "Chat returns no logprobs (use Generate)")
        generation = chat_generation(
            f,
            request_id=f.new_request_id("chat"),
            messages=chat_messages(request.messages),
            tools=chat_tools(request.tools),
            tool_choice=tool_choice(request),
            sampling=checked.sampling,
            thinking=thinking(request),
            n=checked.n,
            stop=checked.stop,
            routing=self._routing(context, request.session_id),
            deadline_s=context.time_remaining(),
        )
        check_min_tokens(generation.sampling, "sampling.min_tokens")
        return generation

    def _tokenize(self, request: serving_pb2.TokenizeRequest) -> list[int]:
        f = self.frontend
        f.check_model(request.model)
        which = request.WhichOneof("input")
        if which == "text":
            return f.encode(text(request.text, "text"))
        if which != "chat":
            raise invalid("input", "one of `text` or `chat` is required")
        chat = request.chat
        try:
            f.check_model(chat.model, "model")
            tools = chat_tools(chat.tools)
            mode, _ = resolve_tool_choice(tools, tool_choice(chat))
            return f.render_chat(chat_messages(chat.messages), tools if mode != "none" else None)
        except ApiError as error:
            raise _within("chat", error) from None

    def _routing(self, context: grpc.aio.ServicerContext, session_id: str) -> Routing:
        tenant = self._tenant(context)
        if tenant is None:  # the interceptor lets no such call through; never run one untenanted
            raise ApiError(ErrorKind.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        return Routing(session_key=text(session_id, "session_id") or None, cache_salt=tenant or None)

    def _tenant(self, context: grpc.aio.ServicerContext) -> str | None:
        """The caller's tenant from its key ("" with keys off; None for a missing or wrong key)."""
        return self.keys.tenant_of_headers(metadata_dict(context.invocation_metadata()))


def _internal_error() -> ApiError:
    """A bug, not the request's fault: logged here, told to the client without details."""
    return ApiError(ErrorKind.INTERNAL, "internal error (logged by the router)")


def _within(field: str, error: ApiError) -> ApiError:
    """``error`` about a field of the message in ``field`` (``messages`` -> ``chat.messages``)."""
    if error.param is None:
        return error
    message = error.message
    if message.startswith(f"{error.param}:"):
        message = f"{field}.{message}"
    return ApiError(error.kind, message, param=f"{field}.{error.param}", retry_after_s=error.retry_after_s)


def _id_metadata(client_id: str, request_id: str) -> tuple[tuple[str, str], ...]:
    ids = ((SERVER_ID_KEY, request_id),)
    return ((REQUEST_ID_KEY, client_id), *ids) if client_id else ids


async def _fail(context: grpc.aio.ServicerContext, error: ApiError, client_id: str = "") -> NoReturn:
    """End the call with ``error`` as its status (``context.abort`` raises)."""
    trailing: list[tuple[str, str]] = []
    if error.retry_after_s is not None:
        trailing.append(("retry-after", str(error.retry_after_s)))
    if client_id:
        trailing.append((REQUEST_ID_KEY, client_id))
    message = error.message
    if error.param and error.param not in message:  # a status message always names the field
        message = f"{error.param}: {message}"
    await context.abort(error.kind.grpc_code, message, trailing_metadata=tuple(trailing))
    raise AssertionError("context.abort returned")  # pragma: no cover
