"""``k2serve serve`` and ``k2serve cluster``: bring up the cluster and the router in this process.

Lifecycle: resolve a ``ClusterConfig`` (``--config FILE``; or ``MODEL_DIR`` with the demo layout;
or ``--demo``, which first writes the tiny model to a cache folder) -> the cluster token
(``K2SERVE_CLUSTER_TOKEN``, else a fresh one; ``cluster --no-router`` needs the variable) -> start or join Ray
(``RayRuntime``, token auth on) -> launch the ``Controller`` (it places and starts every worker
group and serves the registry) -> wait until every group is ready -> run the router
(``router_main.serve_router``: REST and gRPC on ``router.host``, a ``Dispatcher`` kept equal to
the registry's ready workers) -> print one ``k2serve: ready ...`` line -> serve until
SIGINT/SIGTERM (``cluster --no-router``: no router here; routers elsewhere follow the registry)
-> drain: the router answers 503 to readiness and new requests at once and gives the requests in
flight ``--grace`` seconds (then aborts them); the controller drains every group in what is left of
the grace and stops it; Ray is shut down (or disconnected). Exit status 0 after a clean stop, 1 when the
cluster could not come up, 2 for bad flags or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.controller_handle import ControllerHandle
from k2serve.cluster.ray_runtime import RayRuntime
from k2serve.proto.cluster_token import ENV_VAR, new_token
from k2serve.router.policy import parse_policy
from k2serve.router.router_server import DrainReport
from k2serve.router_main import (
    api_keys,
    build_frontend,
    cluster_token_from_env,
    registry_follower,
    router_dispatcher,
    serve_router,
)


def resolve_config(args: argparse.Namespace) -> ClusterConfig:
    if getattr(args, "config", None):
        config = ClusterConfig.from_yaml(args.config)
    elif getattr(args, "demo", False):
        config = ClusterConfig.demo(demo_model(Path(args.demo_dir).expanduser()), colocated=args.colocated)
    elif getattr(args, "model", None):
        config = ClusterConfig.demo(Path(args.model), colocated=args.colocated)
    else:
        raise ValueError("serve: give MODEL_DIR, --demo or --config FILE")
    flags = (
        ("host", args.host),
        ("port", args.port),
        ("grpc_port", getattr(args, "grpc_port", None)),
        ("tls_cert", getattr(args, "tls_cert", None)),
        ("tls_key", getattr(args, "tls_key", None)),
        ("tls_ca", getattr(args, "tls_ca", None)),
    )
    overrides = {k: v for k, v in flags if v is not None}
    if overrides:
        data = config.to_dict()
        data["router"] = {**data.get("router", {}), **overrides}
        config = ClusterConfig.from_dict(data)
    return config


def cluster_token(args: argparse.Namespace) -> str:
    """The token the cluster's internal calls need (``proto/cluster_token.py``): ``K2SERVE_CLUSTER_TOKEN``,
    else a fresh one, which only this process knows. So ``cluster --no-router``, whose routers run
    elsewhere, needs the variable (ValueError otherwise)."""
    token = cluster_token_from_env()
    if token is not None:
        return token
    if getattr(args, "no_router", False):
        raise ValueError(f"cluster --no-router: set {ENV_VAR} (the routers elsewhere need the same token)")
    return new_token()


def demo_model(folder: Path) -> Path:
    """The tiny demo model in ``folder``, written there on first use."""
    if not (folder / "config.json").is_file():
        from k2serve.tiny_model import make_tiny_model

        print(f"k2serve: writing the tiny demo model to {folder}", file=sys.stderr, flush=True)
        make_tiny_model(folder, preset="tiny", force=True)
    return folder


class _StopRequested(Exception):
    """SIGINT/SIGTERM before the router serves: stop starting and clean up."""


@dataclass
class _Signals:
    """Before the router serves, SIGINT/SIGTERM abort the start-up (the teardown still runs). While it
    serves, ``router_main.serve_router`` owns them (drain); after it, this handler ignores them, so
    the cluster teardown (itself bounded) is not cut short."""

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
    signals = _Signals()
    grace_left = args.grace  # what the groups' drain gets at the stop
    token = cluster_token(args)
    token_source = ENV_VAR if cluster_token_from_env() else "generated, known to this process only"
    runtime = RayRuntime.start(config.ray, bind_host=config.network.interface_host)
    signals.install()
    controller: ControllerHandle | None = None
    try:
        controller = ControllerHandle.launch(config, cluster_token=token)
        if getattr(args, "no_router", False):
            return _head(controller, args.ready_timeout)
        if not controller.wait_ready(args.ready_timeout):
            status = controller.status()
            print(f"k2serve: the cluster was not ready in {args.ready_timeout:g}s: {status}", file=sys.stderr)
            return 1
        print(f"k2serve: registry at {controller.registry_address} (cluster token: {token_source})", flush=True)
        signals.serving = True
        signals.install()
        report = asyncio.run(_route(config, controller.registry_address, args.grace, token))
        # the groups drain too (routers elsewhere may use them), in what is left of the grace
        grace_left = max(0.0, args.grace - report.seconds)
        return 0
    except _StopRequested as stop:
        print(f"k2serve: {stop}; stopping", file=sys.stderr)
        return 0
    finally:
        started = time.monotonic()
        if controller is not None:
            with contextlib.suppress(Exception):
                controller.shutdown(grace_s=grace_left, timeout_s=grace_left + 20.0)
        workers_s = time.monotonic() - started
        runtime.shutdown()
        ray_s = time.monotonic() - started - workers_s
        print(f"k2serve: workers stopped in {workers_s:.2f} s, Ray in {ray_s:.2f} s", file=sys.stderr, flush=True)


def _head(controller: ControllerHandle, report_every_s: float) -> int:
    """The head of a cluster whose routers run elsewhere: the controller keeps reconciling (a slow
    model load is not a failure; a group that fails is restarted); report until ready, then serve the
    registry until SIGINT/SIGTERM."""
    print(f"k2serve: registry at {controller.registry_address} (no router here)", flush=True)
    while not controller.wait_ready(report_every_s):
        print(f"k2serve: not ready yet: {controller.status()}", file=sys.stderr, flush=True)
    print(f"k2serve: ready; registry at {controller.registry_address} (no router here)", flush=True)
    while True:
        time.sleep(1.0)


async def _route(config: ClusterConfig, registry_address: str, grace_s: float, token: str) -> DrainReport:
    dispatcher = router_dispatcher(config.router, parse_policy(config.router.policy), token)
    max_model_len = min(p.max_model_len for p in config.pools)
    frontend = build_frontend(config.model, config.router, max_model_len, dispatcher)
    first, follow = registry_follower(registry_address, frontend.scrape_targets, token)
    await first(dispatcher)
    return await serve_router(frontend, config.router, api_keys(None), follow, grace_s)
