"""A real router (REST + gRPC on loopback) over real worker ranks of a tiny model, for the API tests.

``live_router(model_dir, roles=("mixed",))`` starts, in a background thread with its own event
loop, one in-process ``WorkerServer`` per role ("mixed" = colocated; ("prefill", "decode") =
disaggregated) and a ``RouterServer`` in front of them, and yields a ``LiveRouter``: the URLs,
``run(coroutine)`` to run something on that loop (bounded), and ``loads()`` (every worker's
``GetLoad``). Synchronous SDK clients (openai, anthropic, a gRPC stub) can call it from the test's
thread. Everything stops when the ``with`` block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.router.admission import Admission, AdmissionLimits
from k2serve.router.chat_template import ChatTemplate
from k2serve.router.frontend import Frontend, ServedModel
from k2serve.router.http_guard import DEFAULT_MAX_BODY_BYTES
from k2serve.router.router_server import RouterOptions, RouterServer
from k2serve.router.sampling_check import RequestLimits
from k2serve.router.tokenizer import KimiTokenizer
from k2serve.router.worker_client import Dispatcher, WorkerEndpoint
from k2serve.workers.group_rank import GroupRank, RankSpec
from k2serve.workers.service import WorkerOptions, WorkerServer

T = TypeVar("T")
MAX_MODEL_LEN = 256
START_TIMEOUT_S = 120.0


@dataclass
class LiveRouter:
    http_url: str
    grpc_target: str
    model_name: str
    model_dir: Path
    frontend: Frontend
    workers: list[WorkerServer]
    loop: asyncio.AbstractEventLoop
    api_key: str | None = None

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def loads(self) -> list[worker_pb2.Load]:
        async def all_loads() -> list[worker_pb2.Load]:
            out = []
            for server in self.workers:
                async with grpc.aio.insecure_channel(server.address) as channel:
                    out.append(
                        await worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
                    )
            return out

        return self.run(all_loads())


@contextlib.contextmanager
def live_router(
    model_dir: Path,
    roles: tuple[str, ...] = ("mixed",),
    *,
    api_keys: tuple[str, ...] = (),
    admission: AdmissionLimits | None = None,
    limits: RequestLimits | None = None,
    num_blocks: int = 128,
    block_size: int = 4,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_model_len: int = MAX_MODEL_LEN,
    **worker_options: Any,
) -> Iterator[LiveRouter]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="live-router", daemon=True)
    thread.start()
    workers: list[WorkerServer] = []
    router: RouterServer | None = None
    dispatcher = Dispatcher()

    async def start() -> LiveRouter:
        nonlocal router
        spec = RankSpec(model_dir=model_dir, num_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len)
        for i, role in enumerate(roles):
            rank = await asyncio.to_thread(GroupRank.build, spec)
            options = WorkerOptions(f"{role}-{i}", role, **worker_options)
            workers.append(await WorkerServer.start(rank, options))
        await dispatcher.update(WorkerEndpoint(w.options.worker_id, w.options.role, w.address) for w in workers)
        tokenizer = KimiTokenizer.from_model_dir(model_dir)
        model = ServedModel(name=model_dir.name, root=str(model_dir), max_model_len=max_model_len)
        frontend = Frontend(
            dispatcher,
            tokenizer,
            ChatTemplate.from_model_dir(model_dir),
            model,
            Admission(admission or AdmissionLimits()),
            limits or RequestLimits(),
        )
        options = RouterOptions(host="127.0.0.1", port=0, grpc_port=0, api_keys=api_keys, max_body_bytes=max_body_bytes)
        router = await RouterServer.start(frontend, options)
        return LiveRouter(
            http_url=router.http_url,
            grpc_target=router.grpc_target,
            model_name=model.name,
            model_dir=model_dir,
            frontend=frontend,
            workers=workers,
            loop=loop,
            api_key=api_keys[0] if api_keys else None,
        )

    async def stop() -> None:
        if router is not None:
            await router.stop(grace_s=1.0)
        await dispatcher.close()
        for server in workers:
            await server.stop(grace_s=2.0)

    try:
        live = asyncio.run_coroutine_threadsafe(start(), loop).result(START_TIMEOUT_S)
        yield live
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
