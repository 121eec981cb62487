"""``RayRuntime``: start an embedded local Ray instance, or connect to an existing cluster; shut it down.

Lifecycle: ``RayRuntime.start(settings)`` -> the controller and its actors run -> ``shutdown()``.
``ray.init`` runs from a neutral working directory (a fresh temporary folder, or ``workdir``):
Ray puts the driver's working directory on every worker's ``sys.path``, and a repository checkout
there would shadow the installed ``k2serve`` packages (DESIGN.md §1). The previous working
directory is restored right after ``ray.init``; the temporary folder is removed at shutdown.

Token authentication (Ray >= 2.52; checked against the installed Ray 2.60 source,
``ray/_private/authentication``). Ray reads its mode from the ``RAY_AUTH_MODE`` environment
variable of every Ray process and its token from ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``. With ``ray.auth: token`` (the default):

- embedded instance: ``RAY_AUTH_MODE=token`` is set before ``ray.init``, so the GCS, the raylet
  and every worker process it starts require the token on every Ray RPC. If no token exists
  (none of the three sources above, and none passed as ``auth_token``), a random 256-bit token is
  generated for this instance and handed to Ray through ``RAY_AUTH_TOKEN`` in this process's
  environment (inherited by the processes Ray starts); nothing is written to disk. Ray's own
  default would write ``~/.ray/auth_token``; we avoid touching the home folder.
- existing cluster (``ray.address``): ``RAY_AUTH_MODE=token`` is set too (Ray does not enable it
  by itself for an explicit address); the token is ``auth_token`` when given, else Ray's own
  sources above. A missing token fails in ``ray.init`` with Ray's ``AuthenticationError``.

With ``ray.auth: disabled``, ``RAY_AUTH_MODE=disabled`` is set explicitly (Ray 2.60 would otherwise
enable token mode for a new local instance by itself). The environment variables set here are put
back as they were at ``shutdown()``. Our own gRPC services (workers, registry) are a separate
matter: they bind ``network.interface_host`` only and speak protobuf only.

Where an embedded instance listens (``bind_host``, normally ``network.interface_host``;
reliability.md S2). Ray 2.60's own servers (GCS, raylet, every core worker, the dashboard agent,
the autoscaler monitor) listen on loopback only when the node's IP is exactly loopback, and on
every interface (``0.0.0.0`` / ``::``) otherwise: there is no per-address bind option. Ray also
replaces a loopback ``_node_ip_address`` by the machine's routable IP unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off (``ray._private.services.resolve_ip_for_localhost``).
So a loopback ``bind_host`` (the default) sets that variable to 0 for every Ray process, turns
the constant Ray computed from it at import off in this process, and starts the node on
127.0.0.1: then no Ray port is reachable from another machine. ``"node"`` leaves the node IP to
Ray; any other address becomes the node IP, and Ray's ports then listen on every interface (a
multi-node cluster needs them reachable; keep such nodes on a private network, S3). Both are put
back at ``shutdown()``. A driver joining a loopback cluster (``address: auto`` finding the local
instance, or ``127.0.0.1:port``) turns the same switch on, or Ray would look for the cluster at the
machine's routable IP.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import ray
from ray._private import ray_constants, services

from k2serve.cluster.config import RaySettings

logger = logging.getLogger(__name__)

AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps a loopback node IP as it is
NODE_IP = "node"  # bind_host meaning "the node IP Ray picks" (network.interface_host's "node")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class RayRuntime:
    settings: RaySettings
    embedded: bool  # True: this process started the instance and shuts it down
    auth: str  # "token" or "disabled", as enabled for this instance
    generated_token: bool = False  # a per-instance token was made because none existed
    _workdir: Path | None = None  # the temporary neutral folder we created (removed at shutdown)
    _saved_env: dict[str, str | None] = field(default_factory=dict)
    _saved_cluster_flag: bool | None = None  # Ray's ENABLE_RAY_CLUSTER before a loopback start

    @classmethod
    def start(
        cls,
        settings: RaySettings,
        *,
        workdir: str | Path | None = None,
        auth_token: str | None = None,
        bind_host: str = "127.0.0.1",
    ) -> RayRuntime:
        """Start (``settings.address`` is None) or connect (otherwise). Raises if Ray is already up here.

        ``bind_host``: where an embedded instance listens (see the module docstring); ignored when
        connecting to an existing cluster (its nodes were started by ``ray start``; one on loopback is
        joined as a loopback node)."""
        if ray.is_initialized():
            raise RuntimeError("Ray is already initialized in this process; shut it down or reuse that instance")
        embedded = settings.address is None
        runtime = cls(settings=settings, embedded=embedded, auth=settings.auth)
        runtime._configure_auth(auth_token)
        neutral = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="k2serve-ray-"))
        if workdir is None:
            runtime._workdir = neutral
        try:
            with _working_directory(neutral):
                if settings.address is None:
                    _init_embedded(settings, runtime._configure_bind(bind_host))
                else:
                    if _is_loopback_cluster(settings.address):
                        runtime._configure_bind("127.0.0.1")
                    ray.init(address=settings.address, namespace=settings.namespace)
        except BaseException:
            runtime._restore()
            raise
        logger.info(
            "ray %s (%s, namespace %s, auth %s)",
            "started" if embedded else "connected",
            settings.address or "embedded",
            settings.namespace,
            runtime.auth,
        )
        return runtime

    def shutdown(self) -> None:
        """Disconnect (and stop the embedded instance); restore the environment. Idempotent."""
        if ray.is_initialized():
            ray.shutdown()
        self._restore()

    def _configure_auth(self, auth_token: str | None) -> None:
        if self.settings.auth == "disabled":
            self._set_env(AUTH_MODE_ENV, "disabled")
            _reload_ray_auth()
            return
        self._set_env(AUTH_MODE_ENV, "token")
        if auth_token is not None:
            self._set_env(AUTH_TOKEN_ENV, auth_token)
        elif self.embedded and not _token_available():
            self._set_env(AUTH_TOKEN_ENV, secrets.token_hex(32))
            self.generated_token = True
        _reload_ray_auth()

    def _configure_bind(self, bind_host: str) -> str | None:
        """The node IP to start the embedded instance on (None: Ray's choice)."""
        if bind_host == NODE_IP:
            return None
        if bind_host not in LOOPBACK_HOSTS:
            return bind_host
        self._set_env(CLUSTER_ENV, "0")
        self._saved_cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False  # computed from CLUSTER_ENV when ray was imported
        return "127.0.0.1"

    def _set_env(self, name: str, value: str) -> None:
        self._saved_env.setdefault(name, os.environ.get(name))
        os.environ[name] = value

    def _restore(self) -> None:
        if self._saved_cluster_flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = self._saved_cluster_flag
            self._saved_cluster_flag = None
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if self._saved_env:
            self._saved_env.clear()
            _reload_ray_auth()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


# What ``ray.init`` of a new local instance raises when its processes do not come up in Ray's own bounds
# on a loaded 2-core machine: the GCS's port file, or the raylet registering with the GCS (30 s).
_START_TIMEOUTS = ("Timed out waiting for file", "The current node timed out during startup")
_RAY_PROCESS_NAMES = ("gcs_server", "raylet")


def _init_embedded(settings: RaySettings, node_ip: str | None, attempts: int = 2) -> None:
    """``ray.init`` of a new local instance; one that does not come up in Ray's own bounds (see
    ``_START_TIMEOUTS``) gets one more try, after the processes it started are stopped."""
    options: dict[str, Any] = {} if node_ip is None else {"_node_ip_address": node_ip}
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=settings.num_cpus, include_dashboard=False, namespace=settings.namespace, **options)
            return
        except Exception as exc:  # Ray raises a bare Exception for the raylet's timeout
            if not any(marker in str(exc) for marker in _START_TIMEOUTS) or attempt + 1 == attempts:
                raise
            logger.warning("ray: the local instance did not start (%s); trying again", exc)
            ray.shutdown()
            _stop_ray_children()


def _stop_ray_children(grace_s: float = 5.0) -> None:
    """Stop what a failed ``ray.init`` left running under this process (its node was never
    registered, so ``ray.shutdown`` does not know it): the GCS, the raylet and Ray's Python helpers."""

    def started_by_ray(proc: psutil.Process) -> bool:
        try:
            name = proc.name()
            if name in _RAY_PROCESS_NAMES or name.startswith("ray::"):  # ray:: names its agents and workers
                return True
            return any("/ray/" in part for part in proc.cmdline()[1:3])  # python -u .../ray/<helper>.py
        except psutil.Error:
            return False

    found = [proc for proc in psutil.Process().children(recursive=True) if started_by_ray(proc)]
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(found, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _is_loopback_cluster(address: str) -> bool:
    """Whether the cluster ``address`` names (``auto``: the local one Ray finds) listens on loopback:
    then this driver must join it as a loopback node too (Ray would otherwise rewrite 127.0.0.1 to the
    machine's routable IP and find no GCS or raylet there)."""
    try:
        found = services.get_ray_address_from_environment(address, None)
    except ConnectionError:
        return False  # none running: ray.init says so
    host = str(found).rpartition(":")[0].strip("[]")
    return host in LOOPBACK_HOSTS


def _reload_ray_auth() -> None:
    """Make this process's Ray see the environment just set: Ray caches its config (the auth mode)
    and the token when ``ray`` is imported, and refreshes them the same way when it enables token
    auth itself (``ray._private.authentication.authentication_token_setup._enable_token_auth``)."""
    raylet: Any = ray._raylet
    raylet.Config.initialize("")
    loader = getattr(raylet, "AuthenticationTokenLoader", None)
    if loader is not None:
        loader.instance().reset_cache()


def _token_available() -> bool:
    """Whether Ray would find a token by itself (the env variable, the named file, the default file)."""
    if os.environ.get(AUTH_TOKEN_ENV):
        return True
    named = os.environ.get(AUTH_TOKEN_PATH_ENV)
    if named:
        return Path(named).is_file()
    return (Path.home() / ".ray" / "auth_token").is_file()


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)
