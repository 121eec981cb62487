"""A real router (REST + gRPC on loopback) over real worker ranks of a tiny model, for the API tests.

``live_router(model_dir, roles=("mixed",))`` starts, in a background thread with its own event
loop, one in-process ``WorkerServer`` per role ("mixed" = colocated; ("prefill", "decode") =
disaggregated) and a ``RouterServer`` in front of them, and yields a ``LiveRouter``: the URLs,
``run(coroutine)`` to run something on that loop (bounded), and ``loads()`` (every worker's
``GetLoad``). Synchronous SDK clients (openai, anthropic, a gRPC stub) can call it from the test's
thread. Everything stops when the ``with`` block ends.

Knobs for the fault tests: ``proxied=(i, ...)`` puts a ``TcpProxy`` (tests/tcp_proxy.py, its own
thread) between the router and worker ``i``: the dispatcher dials the proxy's address, the test
switches its mode through ``live.proxies[i]``, and ``loads()`` still asks every worker directly;
``request_timeout_s`` bounds every worker call of a request without a client deadline (the
dispatcher's); ``policy`` names the routing policy; ``worker_overrides={i: {...}}`` adds
``WorkerOptions`` fields to worker ``i`` only (a fault plan on one rank, say); ``router_options``
adds ``RouterOptions`` fields (the REST server's timeouts, say).
``live.wait_quiet()`` waits (bounded) until the router runs nothing and every worker is idle with
all its blocks free and no lease, and returns how long that took.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from tcp_proxy import TcpProxy

from k2serve.proto import worker_pb2, worker_pb2_grpc
from k2serve.router.admission import Admission, AdmissionLimits
from k2serve.router.chat_template import ChatTemplate
from k2serve.router.dispatcher import Dispatcher
from k2serve.router.frontend import Frontend, ServedModel
from k2serve.router.http_guard import DEFAULT_MAX_BODY_BYTES
from k2serve.router.policy import RoutingPolicy
from k2serve.router.router_server import RouterOptions, RouterServer
from k2serve.router.sampling_check import RequestLimits
from k2serve.router.tokenizer import KimiTokenizer
from k2serve.router.worker_client import WorkerEndpoint
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
    proxies: dict[int, TcpProxy] = field(default_factory=dict)  # worker index -> the proxy in front of it

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

    def wait_quiet(self, timeout_s: float = 10.0, poll_s: float = 0.05) -> float:
        """Seconds until no request runs or waits anywhere, every block is free and no lease or pinned
        block is left; fails with the last loads when that does not happen within ``timeout_s``."""
        t0 = time.monotonic()
        while True:
            loads = self.loads()
            admission = self.frontend.admission
            if admission.running == 0 and admission.waiting == 0 and all(_idle(load) for load in loads):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise AssertionError(
                    f"not quiet after {timeout_s:g} s: admission running {admission.running} waiting "
                    f"{admission.waiting}; loads {[_brief(load) for load in loads]}"
                )
            time.sleep(poll_s)


def _idle(load: worker_pb2.Load) -> bool:
    return bool(
        load.running == 0
        and load.waiting == 0
        and load.free_blocks == load.num_blocks
        and load.leases == 0
        and load.pinned_blocks == 0
    )


def _brief(load: worker_pb2.Load) -> str:
    return (
        f"{load.worker_id}: running {load.running} waiting {load.waiting} free {load.free_blocks}/"
        f"{load.num_blocks} leases {load.leases} pinned {load.pinned_blocks}"
    )


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
    proxied: tuple[int, ...] = (),
    request_timeout_s: float | None = None,
    policy: str | None = None,
    worker_overrides: dict[int, dict[str, Any]] | None = None,
    router_options: dict[str, Any] | None = None,
    **worker_options: Any,
) -> Iterator[LiveRouter]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="live-router", daemon=True)
    thread.start()
    workers: list[WorkerServer] = []
    router: RouterServer | None = None
    proxies: dict[int, TcpProxy] = {}
    dispatcher = Dispatcher()
    if request_timeout_s is not None:
        dispatcher.request_timeout_s = request_timeout_s
    if policy is not None:
        dispatcher.policy = RoutingPolicy(policy)  # same block size: the prefix index stays valid

    async def start() -> LiveRouter:
        nonlocal router
        spec = RankSpec(model_dir=model_dir, num_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len)
        for i, role in enumerate(roles):
            rank = await asyncio.to_thread(GroupRank.build, spec)
            options = WorkerOptions(f"{role}-{i}", role, **{**worker_options, **(worker_overrides or {}).get(i, {})})
            workers.append(await WorkerServer.start(rank, options))
        for i in proxied:
            proxies[i] = await asyncio.to_thread(TcpProxy.start, workers[i].address)
        await dispatcher.update(
            WorkerEndpoint(w.options.worker_id, w.options.role, proxies[i].address if i in proxies else w.address)
            for i, w in enumerate(workers)
        )
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
        options = RouterOptions(
            host="127.0.0.1",
            port=0,
            grpc_port=0,
            api_keys=api_keys,
            max_body_bytes=max_body_bytes,
            **(router_options or {}),
        )
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
            proxies=proxies,
        )

    async def stop() -> None:
        if router is not None:
            await router.stop(grace_s=1.0)
        await dispatcher.close()
        for server in workers:
            await server.stop(grace_s=2.0)
        for proxy in proxies.values():
            await asyncio.to_thread(proxy.close)

    try:
        live = asyncio.run_coroutine_threadsafe(start(), loop).result(START_TIMEOUT_S)
        yield live
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
