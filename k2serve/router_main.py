"""The router process: ``k2serve router`` on its own, and the router half of ``k2serve serve``.

Lifecycle: ``build_frontend`` reads the model folder's tokenizer, chat template and context length
(no weights, no torch) and wires the ``Frontend`` to a ``Dispatcher``; ``serve_router`` starts the
``RouterServer`` (REST + gRPC on the configured interface), keeps the dispatcher equal to the live
worker set (``follow``: the registry's ``Watch`` stream, or a fixed list), prints one
``k2serve: ready ...`` line and serves. SIGINT/SIGTERM drains it: readiness (``GET /health``, gRPC
health) and new requests answer 503 / UNAVAILABLE at once, requests in flight get ``grace_s`` to
finish, the rest are aborted (finish reason ``abort``); a second signal ends the grace at once.
``serve_router`` returns the ``DrainReport`` once both listeners are closed.

``k2serve router --registry HOST:PORT`` (or ``--worker ID=ROLE@HOST:PORT`` ...) is how a router
runs as its own deployment (Kubernetes: a ``Deployment`` beside the Ray cluster). API keys come
from ``K2SERVE_API_KEYS`` (comma-separated) or ``--api-key``; none = authentication off. With
``--tls-cert``/``--tls-key`` both listeners speak TLS (``--tls-ca``: mutual TLS); the router's own
calls to workers stay plaintext on the cluster's private interface and carry the cluster token from
``K2SERVE_CLUSTER_TOKEN`` (``proto/cluster_token.py``; unset = none, for a cluster without one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from k2serve.cluster.config import RouterSettings
from k2serve.cluster.registry_client import RegistryClient, RegistryUnavailableError
from k2serve.cluster.worker_record import WorkerSnapshot
from k2serve.proto.cluster_token import ENV_VAR, checked_token
from k2serve.router.admission import Admission, AdmissionLimits
from k2serve.router.chat_template import ChatTemplate
from k2serve.router.dispatcher import Dispatcher
from k2serve.router.frontend import Frontend, ServedModel
from k2serve.router.policy import RoutingPolicy, parse_policy
from k2serve.router.router_server import DrainReport, RouterOptions, RouterServer, TlsError, TlsFiles
from k2serve.router.scrape_targets import ScrapeTarget, ScrapeTargets
from k2serve.router.tokenizer import KimiTokenizer
from k2serve.router.worker_client import WorkerEndpoint

Follow = Callable[[Dispatcher], Coroutine[Any, Any, None]]
REGISTRY_WAIT_S = 600.0  # a router may start long before the head node's registry
REGISTRY_RETRY_S = 5.0


def model_context_length(model_dir: Path) -> int:
    """``max_position_embeddings`` of the folder's ``config.json`` (what the weights support)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_position_embeddings", 4096))


def build_frontend(model_dir: Path, settings: RouterSettings, max_model_len: int, dispatcher: Dispatcher) -> Frontend:
    limits = AdmissionLimits(settings.max_running, settings.max_waiting, settings.max_wait_s)
    model = ServedModel(settings.served_model_name or model_dir.name, str(model_dir), max_model_len)
    tokenizer = KimiTokenizer.from_model_dir(model_dir)
    return Frontend(dispatcher, tokenizer, ChatTemplate.from_model_dir(model_dir), model, Admission(limits))


def router_dispatcher(settings: RouterSettings, policy: RoutingPolicy, cluster_token: str | None) -> Dispatcher:
    """The ``Dispatcher`` of a router with ``settings`` (migration and stall bounds) and ``policy``; its
    calls to workers carry ``cluster_token``."""
    return Dispatcher(
        policy=policy,
        cluster_token=cluster_token,
        migration_limit=settings.migration_limit,
        stall_timeout_s=settings.stall_timeout_s,
        kv_push=settings.kv_push,
    )


def api_keys(flag_values: Sequence[str] | None) -> tuple[str, ...]:
    keys = [k.strip() for k in os.environ.get("K2SERVE_API_KEYS", "").split(",")]
    return tuple(k for k in [*keys, *(flag_values or ())] if k)


async def serve_router(
    frontend: Frontend, settings: RouterSettings, keys: tuple[str, ...], follow: Follow, grace_s: float
) -> DrainReport:
    options = RouterOptions(
        host=settings.host,
        port=settings.port,
        grpc_port=settings.grpc_port,
        api_keys=keys,
        max_body_bytes=settings.max_body_bytes,
        tls=tls_files(settings),
    )
    server = await RouterServer.start(frontend, options)
    frontend.dispatcher.start_monitor()
    follower = asyncio.create_task(follow(frontend.dispatcher), name="worker-set")
    workers = ", ".join(f"{e.worker_id}={e.address}" for e in frontend.dispatcher.endpoints)
    auth = "on" if keys else "off"
    tls = "off" if options.tls is None else ("mutual" if options.tls.mutual else "on")
    print(
        f"k2serve: ready at {server.http_url} (gRPC {server.grpc_target}, API keys {auth}, TLS {tls}; "
        f"workers: {workers})",
        flush=True,
    )
    loop = asyncio.get_running_loop()
    with stop_signals(lambda: loop.call_soon_threadsafe(server.request_stop)):
        try:
            await server.wait()  # a signal: readiness and new requests are 503 from here on
            if server.draining:
                print(f"k2serve: draining (grace {grace_s:g} s)", file=sys.stderr, flush=True)
        finally:
            report = await server.stop(grace_s=grace_s)  # a second signal ends the grace early
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            await frontend.dispatcher.close()
    print(f"k2serve: router drained in {report.seconds:.2f} s ({report.aborted} aborted)", file=sys.stderr, flush=True)
    return report


@contextlib.contextmanager
def stop_signals(on_signal: Callable[[], object]) -> Iterator[None]:
    """SIGINT/SIGTERM call ``on_signal`` (every time: the first starts the drain, a second ends its
    grace) while the block runs; the previous handlers come back after it. Main thread only (elsewhere
    Python delivers no signals, and this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, lambda signum, frame: on_signal())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def tls_files(settings: RouterSettings) -> TlsFiles | None:
    """The checked TLS files of the router's listeners (``TlsError``, a ValueError, names the setting)."""
    names = ("router.tls_cert", "router.tls_key", "router.tls_ca")
    return TlsFiles.of(settings.tls_cert, settings.tls_key, settings.tls_ca, names=names)


def cluster_token_from_env() -> str | None:
    """``K2SERVE_CLUSTER_TOKEN`` checked (ValueError naming it), or None when unset."""
    return checked_token(os.environ.get(ENV_VAR))


def registry_follower(
    address: str,
    targets: ScrapeTargets,
    cluster_token: str | None,
    wait_s: float = REGISTRY_WAIT_S,
    retry_s: float = REGISTRY_RETRY_S,
) -> tuple[Follow, Follow]:
    """(``first``: load the current set once, ``follow``: keep following it) for ``address``; both
    also keep ``targets`` (the ``/metrics`` endpoints for service discovery) equal to the set.

    ``first`` waits up to ``wait_s`` for a registry that is not up yet (a router that starts before
    the head node), then raises ``RegistryUnavailableError``. ``follow`` never gives up while the
    router runs: when the registry stays away (a restarting head) it keeps routing to the last set
    and tries again every ``retry_s``. A registry that refuses ``cluster_token`` fails ``first`` at once."""
    registry = RegistryClient(address, cluster_token=cluster_token)

    async def apply(snapshot: WorkerSnapshot, dispatcher: Dispatcher) -> None:
        await dispatcher.update(endpoints_of(snapshot.ready()))
        targets.update(scrape_targets_of(snapshot))

    async def first(dispatcher: Dispatcher) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                await apply(await registry.list(), dispatcher)
                return
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise RegistryUnavailableError(
                        f"registry {address} refused this router's cluster token: set {ENV_VAR} to the cluster's"
                    ) from exc
                if time.monotonic() + retry_s > deadline:
                    raise RegistryUnavailableError(f"registry {address}: not reachable in {wait_s:g}s") from exc
                print(f"k2serve: waiting for the registry at {address}", file=sys.stderr, flush=True)
                await asyncio.sleep(retry_s)

    async def follow(dispatcher: Dispatcher) -> None:
        while True:
            try:
                async for snapshot in registry.watch():
                    await apply(snapshot, dispatcher)
            except RegistryUnavailableError as exc:
                print(f"k2serve: {exc}; keeping the last worker set", file=sys.stderr, flush=True)
            await asyncio.sleep(retry_s)

    return first, follow


def scrape_targets_of(snapshot: WorkerSnapshot) -> list[ScrapeTarget]:
    workers = [
        ScrapeTarget(w.metrics_address, {"worker": w.worker_id, "pool": w.pool, "role": w.role, "group": str(w.group)})
        for w in snapshot.workers
    ]
    return [*workers, ScrapeTarget(snapshot.controller_metrics_address, {"role": "controller"})]


def endpoints_of(records: Sequence[object]) -> list[WorkerEndpoint]:
    return [
        WorkerEndpoint(r.worker_id, r.role, r.address)  # type: ignore[attr-defined]
        for r in records
        if r.address  # type: ignore[attr-defined]
    ]


def parse_worker(text: str) -> WorkerEndpoint:
    """``ID=ROLE@HOST:PORT`` (role: mixed | prefill | decode)."""
    worker_id, _, rest = text.partition("=")
    role, _, address = rest.partition("@")
    if not worker_id or role not in ("mixed", "prefill", "decode") or ":" not in address:
        raise ValueError(f"--worker: expected ID=ROLE@HOST:PORT with ROLE mixed|prefill|decode, got {text!r}")
    return WorkerEndpoint(worker_id, role, address)


def run_router(args: argparse.Namespace) -> int:
    model_dir = Path(args.model)
    settings = RouterSettings(
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        policy=args.policy,
        served_model_name=args.served_model_name,
        max_running=args.max_running,
        max_waiting=args.max_waiting,
        max_wait_s=args.max_wait,
        max_body_bytes=args.max_body_bytes,
        migration_limit=args.migration_limit,
        stall_timeout_s=args.stall_timeout,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
    )
    try:
        TlsFiles.of(args.tls_cert, args.tls_key, args.tls_ca, names=("--tls-cert", "--tls-key", "--tls-ca"))
    except TlsError as exc:
        raise ValueError(f"router: {exc}") from None
    max_model_len = args.max_model_len or model_context_length(model_dir)
    policy = parse_policy(settings.policy)
    fixed = [parse_worker(w) for w in args.worker or ()]
    if bool(fixed) == bool(args.registry):
        raise ValueError("router: give either --registry HOST:PORT or one or more --worker")

    token = cluster_token_from_env()

    async def main() -> int:
        dispatcher = router_dispatcher(settings, policy, token)
        frontend = build_frontend(model_dir, settings, max_model_len, dispatcher)
        if args.registry:
            first, follow = registry_follower(args.registry, frontend.scrape_targets, token, wait_s=args.registry_wait)
            try:
                await first(dispatcher)
            except RegistryUnavailableError as exc:
                print(f"k2serve: {exc}", file=sys.stderr)
                return 1
        else:
            await dispatcher.update(fixed)

            async def follow(_: Dispatcher) -> None:
                return None

        await serve_router(frontend, settings, api_keys(args.api_key), follow, args.grace)
        return 0

    return asyncio.run(main())
