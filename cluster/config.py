"""``ClusterConfig``: the whole cluster, read from one YAML file (what the Helm ConfigMap renders).

Lifecycle: ``ClusterConfig.from_yaml(path)`` (or ``from_dict``) parses and validates every section
once, raising ``ClusterConfigError`` with the dotted path of the first bad key (unknown keys are
errors); the result is frozen and handed to the Ray runtime and the controller. CLI flags override
it with ``dataclasses.replace`` (CLI > file > defaults). Values found at run time (KV blocks from a
memory budget, addresses) are never written back into it.

Shape of the file (every section but ``model`` and ``pools`` is optional)::

    model: /models/Kimi-K2-Thinking
    pools:                      # either prefill + decode (disaggregated) or colocated, not both
      prefill: {groups: 1, ep_size: 8, gpus_per_rank: 1, cpus_per_rank: 4, kv_cache_memory: 40GiB}
      decode:  {groups: 2, ep_size: 8, gpus_per_rank: 1, cpus_per_rank: 4, kv_cache_blocks: 8192}
    router:      {host: 127.0.0.1, port: 8000, grpc_port: 50051, policy: auto}
                 # + tls_cert, tls_key (PEM, both or neither), tls_ca (mutual TLS)
                 # + migration_limit: 3, stall_timeout_s: 30 (request migration; 0 = off)
                 # + kv_push: true (the prefill rank pushes the KV to a decode rank picked first)
    ray:         {address: null, namespace: k2serve, num_cpus: null, detached: false, auth: token}
    network:     {interface_host: 127.0.0.1}   # or "node": each node's Ray IP address
    registry:    {port: 0}
    kv_transfer: {transport: p2p, lease_ttl_s: 30, handoff_wait_s: 30, checksum: false, timeout_s: 30, lanes: 4}
    health:      {interval_s: 5, timeout_s: 3, failures: 3, start_timeout_s: 900}
    restart:     {max_restarts: 5, backoff_initial_s: 1, backoff_max_s: 60, reset_after_s: 600}
    metrics:     {worker_port: 0, controller_port: 0}   # /metrics of each rank and the controller (0 = any port)
    autoscaler:  {enabled: false, ...}   # queue-aware pool scaling: see autoscaler_settings.py
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from k2serve.cluster.autoscaler_settings import AutoscalerSettings, read_autoscaler
from k2serve.cluster.config_error import ClusterConfigError
from k2serve.cluster.config_reader import ConfigReader
from k2serve.cluster.pool_config import PoolConfig, read_pool
from k2serve.workers.config import ModelConfig

PoolShape = Literal["disaggregated", "colocated"]
RayAuth = Literal["token", "disabled"]
KvTransport = Literal["p2p", "grpc"]
_POLICY = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class RouterSettings:
    host: str = "127.0.0.1"
    port: int = 8000  # REST (OpenAI / Anthropic)
    grpc_port: int = 50051
    policy: str = "auto"  # the router's name for a balancing policy; the router validates it
    served_model_name: str | None = None  # None = the model folder's name
    max_running: int = 256  # admission: choices running at once through this router
    max_waiting: int = 1024  # admission: requests queued beyond that (more -> 429)
    max_wait_s: float = 30.0  # admission: the longest a request queues before 429
    max_body_bytes: int = 8 * 2**20  # REST bodies over this -> 413
    migration_limit: int = 3  # re-issues of a request whose rank failed mid-stream (0 = off)
    stall_timeout_s: float = 30.0  # a started stream silent this long counts as a dead rank (0 = off)
    kv_push: bool = True  # decode rank picked before the prefill, which pushes the KV layer by layer (false = pull)
    # TLS of both listeners (PEM files): cert and key together; with a CA, clients need a certificate it
    # signed (mutual TLS). Router -> worker gRPC stays plaintext on network.interface_host.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None = start an embedded local instance
    namespace: str = "k2serve"
    num_cpus: int | None = None  # embedded instance only; None = what Ray detects
    detached: bool = False  # the controller outlives the driver that started it
    auth: RayAuth = "token"  # Ray token authentication (see ray_runtime)


@dataclass(frozen=True)
class NetworkSettings:
    interface_host: str = "127.0.0.1"  # every port we open (gRPC, stores, registry) binds here only


@dataclass(frozen=True)
class RegistrySettings:
    port: int = 0  # Registry gRPC port on network.interface_host; 0 = any free port


MAX_KV_LANES = 16  # = kv_pair_group.MAX_LANES (a test checks), not imported: this module loads without torch


@dataclass(frozen=True)
class KvTransferSettings:
    transport: KvTransport = "p2p"
    lease_ttl_s: float = 30.0  # a prefill rank holds the KV this long past the decode rank's last renewal
    handoff_wait_s: float = 30.0  # a decode rank waits this long (FIFO) for free KV blocks before refusing
    checksum: bool = False  # CRC32 per layer: a corrupted transfer fails (and is re-prefilled) instead of decoding
    timeout_s: float = 30.0  # one transfer, both sides, from its start to the acknowledgement
    lanes: int = 4  # p2p: transfers one decode rank runs at once with one prefill rank (1..16)


@dataclass(frozen=True)
class HealthSettings:
    interval_s: float = 5.0  # between two rounds of checks
    timeout_s: float = 3.0  # one gRPC health Check / actor liveness call
    failures: int = 3  # consecutive failed rounds before a group is restarted
    start_timeout_s: float = 900.0  # placement + model load + first health check of a group


@dataclass(frozen=True)
class RestartSettings:
    max_restarts: int = 5  # per group; after that the group stays failed
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    reset_after_s: float = 600.0  # a group ready this long starts counting its restarts from 0 again


@dataclass(frozen=True)
class MetricsSettings:
    worker_port: int = 0  # each rank's /metrics on network.interface_host; 0 = any free port (found via discovery)
    controller_port: int = 0  # the controller's /metrics, same interface; 0 = any free port


@dataclass(frozen=True)
class ClusterConfig:
    model: Path
    pools: tuple[PoolConfig, ...]
    router: RouterSettings = RouterSettings()
    ray: RaySettings = RaySettings()
    network: NetworkSettings = NetworkSettings()
    registry: RegistrySettings = RegistrySettings()
    kv_transfer: KvTransferSettings = KvTransferSettings()
    health: HealthSettings = HealthSettings()
    restart: RestartSettings = RestartSettings()
    metrics: MetricsSettings = MetricsSettings()
    autoscaler: AutoscalerSettings = dataclasses.field(default_factory=AutoscalerSettings)

    @property
    def served_model_name(self) -> str:
        """The model id clients send and the ``model_name`` label of every metric."""
        return self.router.served_model_name or self.model.name

    @property
    def shape(self) -> PoolShape:
        return "colocated" if any(p.name == "colocated" for p in self.pools) else "disaggregated"

    def pool(self, name: str) -> PoolConfig:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(f"no pool named {name!r}; pools: {[p.name for p in self.pools]}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ClusterConfigError("<file>", f"{path} is not valid YAML: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> ClusterConfig:
        root = ConfigReader(data)
        model = Path(root.text("model"))
        pools = _read_pools(root.section("pools"), _model_config(model))
        config = cls(
            model=model,
            pools=pools,
            router=_read_router(root.section("router")),
            ray=_read_ray(root.section("ray")),
            network=_read_network(root.section("network")),
            registry=_read_registry(root.section("registry")),
            kv_transfer=_read_kv_transfer(root.section("kv_transfer")),
            health=_read_health(root.section("health")),
            restart=_read_restart(root.section("restart")),
            metrics=_read_metrics(root.section("metrics")),
            autoscaler=read_autoscaler(root.section("autoscaler"), tuple(p.name for p in pools)),
        )
        root.finish()
        return config

    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping that ``from_dict`` reads back into an equal config."""
        out = dataclasses.asdict(self)
        out["model"] = str(self.model)
        out["pools"] = {p.name: {k: v for k, v in dataclasses.asdict(p).items() if k != "name"} for p in self.pools}
        return out

    @classmethod
    def demo(cls, model_dir: str | Path, *, colocated: bool = False) -> ClusterConfig:
        """The ``serve --demo`` cluster: one prefill and one decode group (or one colocated group),
        EP=2 each, tiny caches, half a CPU per rank so four ranks fit a 2-core machine."""
        pool = {"groups": 1, "ep_size": 2, "cpus_per_rank": 0.5, "kv_cache_blocks": 64, "max_model_len": 512}
        pools = {"colocated": pool} if colocated else {"prefill": pool, "decode": pool}
        return cls.from_dict(
            {
                "model": str(model_dir),
                "pools": pools,
                "health": {"interval_s": 1.0, "timeout_s": 2.0, "failures": 2, "start_timeout_s": 120.0},
                "restart": {"max_restarts": 3, "backoff_initial_s": 0.5, "backoff_max_s": 5.0},
            }
        )


def _model_config(model: Path) -> ModelConfig | None:
    """The model's config when its config.json is readable here (the head node may not hold the model)."""
    if not (model / "config.json").is_file():
        return None
    try:
        return ModelConfig.from_model_dir(model)
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError
        raise ClusterConfigError("model", f"cannot use {model / 'config.json'}: {exc}") from exc


def _read_pools(reader: ConfigReader, model: ModelConfig | None) -> tuple[PoolConfig, ...]:
    names = set(reader.keys())
    unknown = sorted(names - {"prefill", "decode", "colocated"})
    if unknown:
        raise ClusterConfigError(f"pools.{unknown[0]}", "unknown pool; pools are prefill + decode, or colocated")
    if not names:
        raise ClusterConfigError("pools", "is required: either prefill + decode, or colocated")
    if "colocated" in names and names & {"prefill", "decode"}:
        raise ClusterConfigError("pools", "give either prefill + decode or colocated, not both")
    if "colocated" not in names and names != {"prefill", "decode"}:
        missing = "decode" if "prefill" in names else "prefill"
        raise ClusterConfigError(f"pools.{missing}", "is required with a disaggregated cluster (or use colocated)")
    order = ("colocated",) if "colocated" in names else ("prefill", "decode")
    pools = tuple(read_pool(name, reader.section(name), model) for name in order)
    reader.finish()
    return pools


def _read_router(r: ConfigReader) -> RouterSettings:
    d = RouterSettings()
    policy = r.text("policy", d.policy)
    if not _POLICY.match(policy):
        raise ClusterConfigError(r.where("policy"), f"expected a lower-case name like 'auto', got {policy!r}")
    out = RouterSettings(
        r.text("host", d.host),
        r.port("port", d.port),
        r.port("grpc_port", d.grpc_port),
        policy,
        r.optional_text("served_model_name"),
        r.integer("max_running", d.max_running, minimum=1),
        r.integer("max_waiting", d.max_waiting, minimum=0),
        r.number("max_wait_s", d.max_wait_s, minimum=0.0),
        r.integer("max_body_bytes", d.max_body_bytes, minimum=1024),
        migration_limit=r.integer("migration_limit", d.migration_limit, minimum=0),
        stall_timeout_s=r.number("stall_timeout_s", d.stall_timeout_s, minimum=0.0),
        kv_push=r.flag("kv_push", d.kv_push),
        tls_cert=r.optional_text("tls_cert"),
        tls_key=r.optional_text("tls_key"),
        tls_ca=r.optional_text("tls_ca"),
    )
    _check_tls(r, out)
    r.finish()
    return out


def _check_tls(r: ConfigReader, router: RouterSettings) -> None:
    """Both or neither of the certificate and key; a CA only with them; every named file exists (the
    router checks that they load when it starts)."""
    cert, key, ca = router.tls_cert, router.tls_key, router.tls_ca
    if (cert is None) != (key is None):
        given, missing = ("tls_cert", "tls_key") if cert is not None else ("tls_key", "tls_cert")
        raise ClusterConfigError(r.where(missing), f"is required with router.{given} (give both or neither)")
    if ca is not None and cert is None:
        raise ClusterConfigError(r.where("tls_ca"), "needs router.tls_cert and router.tls_key (mutual TLS)")
    for name, value in (("tls_cert", cert), ("tls_key", key), ("tls_ca", ca)):
        if value is not None and not Path(value).expanduser().is_file():
            raise ClusterConfigError(r.where(name), f"no such file: {value}")


def _read_ray(r: ConfigReader) -> RaySettings:
    d = RaySettings()
    address = r.optional_text("address")
    num_cpus = r.optional_integer("num_cpus", minimum=1)
    if address is not None and num_cpus is not None:
        raise ClusterConfigError(r.where("num_cpus"), "applies to the embedded instance only (ray.address is set)")
    auth = cast(RayAuth, r.choice("auth", ("token", "disabled"), d.auth))
    out = RaySettings(address, r.text("namespace", d.namespace), num_cpus, r.flag("detached", d.detached), auth)
    r.finish()
    return out


def _read_network(r: ConfigReader) -> NetworkSettings:
    out = NetworkSettings(r.text("interface_host", NetworkSettings.interface_host))
    r.finish()
    return out


def _read_registry(r: ConfigReader) -> RegistrySettings:
    out = RegistrySettings(r.port("port", RegistrySettings.port))
    r.finish()
    return out


def _read_metrics(r: ConfigReader) -> MetricsSettings:
    d = MetricsSettings()
    out = MetricsSettings(r.port("worker_port", d.worker_port), r.port("controller_port", d.controller_port))
    r.finish()
    return out


def _read_kv_transfer(r: ConfigReader) -> KvTransferSettings:
    d = KvTransferSettings()
    transport = cast(KvTransport, r.choice("transport", ("p2p", "grpc"), d.transport))
    out = KvTransferSettings(
        transport,
        r.number("lease_ttl_s", d.lease_ttl_s, positive=True),
        r.number("handoff_wait_s", d.handoff_wait_s, positive=True),
        r.flag("checksum", d.checksum),
        r.number("timeout_s", d.timeout_s, positive=True),
        r.integer("lanes", d.lanes, minimum=1, maximum=MAX_KV_LANES),
    )
    r.finish()
    return out


def _read_health(r: ConfigReader) -> HealthSettings:
    d = HealthSettings()
    out = HealthSettings(
        interval_s=r.number("interval_s", d.interval_s, positive=True),
        timeout_s=r.number("timeout_s", d.timeout_s, positive=True),
        failures=r.integer("failures", d.failures, minimum=1),
        start_timeout_s=r.number("start_timeout_s", d.start_timeout_s, positive=True),
    )
    r.finish()
    return out


def _read_restart(r: ConfigReader) -> RestartSettings:
    d = RestartSettings()
    out = RestartSettings(
        max_restarts=r.integer("max_restarts", d.max_restarts, minimum=0),
        backoff_initial_s=r.number("backoff_initial_s", d.backoff_initial_s, positive=True),
        backoff_max_s=r.number("backoff_max_s", d.backoff_max_s, positive=True),
        reset_after_s=r.number("reset_after_s", d.reset_after_s, positive=True),
    )
    if out.backoff_max_s < out.backoff_initial_s:
        raise ClusterConfigError(r.where("backoff_max_s"), "must be >= restart.backoff_initial_s")
    r.finish()
    return out
