"""``k2serve serve`` and ``k2serve cluster``: bring up the cluster and the router in this process.

Lifecycle: resolve a ``ClusterConfig`` (``--config FILE``; or ``MODEL_DIR`` with the demo layout;
or ``--demo``, which first writes the tiny model to a cache folder) -> start or join Ray
(``RayRuntime``, token auth on) -> launch the ``Controller`` (it places and starts every worker
group and serves the registry) -> wait until every group is ready -> run the router: a
``Dispatcher`` kept equal to the registry's ready workers by a watch task, and the HTTP app under
uvicorn on ``router.host:router.port`` -> print one ``k2serve: ready ...`` line -> serve until
SIGINT/SIGTERM -> drain: the HTTP server stops taking requests, the controller drains and stops
every group, Ray is shut down (or disconnected). Exit status 0 after a clean stop, 1 when the
cluster could not come up, 2 for bad flags or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.controller_handle import ControllerHandle
from k2serve.cluster.ray_runtime import RayRuntime
from k2serve.cluster.registry_client import RegistryClient, RegistryUnavailableError
from k2serve.router.http_app import build_app
from k2serve.router.tokenizer import KimiTokenizer
from k2serve.router.worker_client import Dispatcher, WorkerEndpoint


def resolve_config(args: argparse.Namespace) -> ClusterConfig:
    if getattr(args, "config", None):
        config = ClusterConfig.from_yaml(args.config)
    elif getattr(args, "demo", False):
        config = ClusterConfig.demo(_demo_model(Path(args.demo_dir).expanduser()), colocated=args.colocated)
    elif getattr(args, "model", None):
        config = ClusterConfig.demo(Path(args.model), colocated=args.colocated)
    else:
        raise ValueError("serve: give MODEL_DIR, --demo or --config FILE")
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        data = config.to_dict()
        data["router"] = {**data.get("router", {}), **overrides}
        config = ClusterConfig.from_dict(data)
    return config


def _demo_model(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        from k2serve.tiny_model import make_tiny_model

        print(f"k2serve: writing the tiny demo model to {folder}", file=sys.stderr, flush=True)
        make_tiny_model(folder, preset="tiny", force=True)
    return folder


class _StopRequested(Exception):
    """SIGINT/SIGTERM before the router serves: stop starting and clean up."""


@dataclass
class _Signals:
    """While the HTTP server runs, uvicorn owns SIGINT/SIGTERM (graceful stop) and re-raises the
    signal when it is done; this handler then ignores it, so the cluster teardown still runs.
    Before that, a signal aborts the start-up (and the teardown runs too)."""

    serving: bool = False

    def install(self) -> None:
        """(Re)install after Ray connects: ``ray.init`` sets a SIGTERM handler that exits at once."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.serving:
            raise _StopRequested(signal.Signals(signum).name)


def run_serve(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    tokenizer = KimiTokenizer.from_model_dir(config.model)
    signals = _Signals()
    runtime = RayRuntime.start(config.ray)
    signals.install()
    controller: ControllerHandle | None = None
    try:
        controller = ControllerHandle.launch(config)
        if not controller.wait_ready(args.ready_timeout):
            status = controller.status()
            print(f"k2serve: the cluster was not ready in {args.ready_timeout:g}s: {status}", file=sys.stderr)
            return 1
        signals.serving = True
        signals.install()
        return asyncio.run(_route(config, controller.registry_address, tokenizer))
    except _StopRequested as stop:
        print(f"k2serve: {stop} during start-up; stopping", file=sys.stderr)
        return 0
    finally:
        if controller is not None:
            with contextlib.suppress(Exception):
                controller.shutdown(grace_s=args.grace, timeout_s=args.grace + 20.0)
        runtime.shutdown()


async def _route(config: ClusterConfig, registry_address: str, tokenizer: KimiTokenizer) -> int:
    dispatcher = Dispatcher()
    registry = RegistryClient(registry_address)
    await _follow_once(registry, dispatcher)
    follower = asyncio.create_task(_follow(registry, dispatcher), name="registry-watch")
    app = build_app(dispatcher, tokenizer, Path(config.model).name)
    settings = config.router
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", lifespan="off")
    )
    # uvicorn turns SIGINT/SIGTERM into a graceful stop of the HTTP server; the cluster stops after it
    serving = asyncio.create_task(server.serve(), name="http")
    for _ in range(600):  # bounded: 60 s for the socket to be up
        if server.started or serving.done():
            break
        await asyncio.sleep(0.1)
    if not server.started:
        follower.cancel()
        return 1
    port = server.servers[0].sockets[0].getsockname()[1]
    workers = ", ".join(f"{e.worker_id}={e.address}" for e in dispatcher.endpoints)
    print(f"k2serve: ready at http://{settings.host}:{port} (workers: {workers})", flush=True)
    await serving
    follower.cancel()
    await dispatcher.close()
    return 0


async def _follow_once(registry: RegistryClient, dispatcher: Dispatcher) -> None:
    snapshot = await registry.list()
    await dispatcher.update(_endpoints(snapshot.ready()))


async def _follow(registry: RegistryClient, dispatcher: Dispatcher) -> None:
    try:
        async for snapshot in registry.watch():
            await dispatcher.update(_endpoints(snapshot.ready()))
    except RegistryUnavailableError as exc:
        print(f"k2serve: {exc}; keeping the last worker set", file=sys.stderr)


def _endpoints(records: tuple[object, ...]) -> list[WorkerEndpoint]:
    return [
        WorkerEndpoint(r.worker_id, r.role, r.address)  # type: ignore[attr-defined]
        for r in records
        if r.address  # type: ignore[attr-defined]
    ]
