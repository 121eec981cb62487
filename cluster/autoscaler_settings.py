"""``AutoscalerSettings``: the ``autoscaler`` section of the cluster YAML (queue-aware pool scaling).

Lifecycle: ``read_autoscaler`` validates the section once (``ClusterConfig.from_dict``) and returns a
frozen value the controller hands to its ``Autoscaler``. Shape (every key optional; off by default)::

    autoscaler:
      enabled: true
      interval_s: 10            # one decision round
      window_s: 30              # rates and p90s over this much history
      ttft_slo_s: 2.0           # p90 time to first token the prefill (or colocated) pool must hold
      itl_slo_s: 0.1            # p90 inter-token latency the decode (or colocated) pool must hold
      target_utilization: 0.7   # size pools so that their busy fraction comes out at this
      scale_down_utilization: 0.4   # shrink only when one group fewer would stay below this
      kv_target: 0.8            # decode KV use above this asks for another group
      up_cooldown_s: 30         # after any change, no scale-up for this long (the new group starts)
      down_cooldown_s: 120      # after any change, no scale-down for this long
      down_stable_s: 60         # a scale-down must be wanted for this long without a break
      max_step_up: 2            # groups added in one round at most (down: always 1)
      router_metrics_urls: []   # routers' /metrics, for end-to-end TTFT (else the ranks' own)
      pools:
        prefill: {min_groups: 1, max_groups: 4}
        decode:  {min_groups: 1, max_groups: 4, max_seqs: null}
      kubernetes:               # also resize the RayCluster's worker groups (KubeRay)
        enabled: false
        raycluster: k2serve     # RayCluster name
        namespace: null         # null: the pod's own namespace
        worker_groups: {prefill: prefill, decode: decode}   # pool -> workerGroupSpecs[].groupName
        pods_per_group: {prefill: 1, decode: 1}             # worker pods one expert-parallel group needs
"""

from __future__ import annotations

from dataclasses import dataclass, field

from k2serve.cluster.config_error import ClusterConfigError
from k2serve.cluster.config_reader import ConfigReader

_POOL_NAMES = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class PoolScaling:
    min_groups: int = 1
    max_groups: int = 4
    max_seqs: int | None = None  # decode: sequences one group runs within the ITL SLO (None: not used)


@dataclass(frozen=True)
class KubernetesScaling:
    enabled: bool = False
    raycluster: str = "k2serve"
    namespace: str | None = None  # None: the namespace of the pod we run in
    worker_groups: dict[str, str] = field(default_factory=lambda: {"prefill": "prefill", "decode": "decode", "colocated": "colocated"})  # fmt: skip
    pods_per_group: dict[str, int] = field(default_factory=lambda: {"prefill": 1, "decode": 1, "colocated": 1})
    request_timeout_s: float = 10.0


@dataclass(frozen=True)
class AutoscalerSettings:
    enabled: bool = False
    interval_s: float = 10.0
    window_s: float = 30.0
    ttft_slo_s: float = 2.0
    itl_slo_s: float = 0.1
    target_utilization: float = 0.7
    scale_down_utilization: float = 0.4
    kv_target: float = 0.8
    up_cooldown_s: float = 30.0
    down_cooldown_s: float = 120.0
    down_stable_s: float = 60.0
    max_step_up: int = 2
    router_metrics_urls: tuple[str, ...] = ()
    pools: dict[str, PoolScaling] = field(default_factory=dict)  # pool name -> bounds (missing: defaults)
    kubernetes: KubernetesScaling = field(default_factory=KubernetesScaling)

    def pool(self, name: str) -> PoolScaling:
        return self.pools.get(name, PoolScaling())


def read_autoscaler(r: ConfigReader, pool_names: tuple[str, ...]) -> AutoscalerSettings:
    """Validate ``autoscaler``; ``pool_names`` are the cluster's pools (bounds for others are errors)."""
    d = AutoscalerSettings()
    enabled = r.flag("enabled", d.enabled)
    urls = r.raw("router_metrics_urls", [])
    if not isinstance(urls, list | tuple) or not all(
        isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls
    ):
        raise ClusterConfigError(r.where("router_metrics_urls"), f"expected a list of http(s) URLs, got {urls!r}")  # fmt: skip
    out = AutoscalerSettings(
        enabled=enabled,
        interval_s=r.number("interval_s", d.interval_s, positive=True),
        window_s=r.number("window_s", d.window_s, positive=True),
        ttft_slo_s=r.number("ttft_slo_s", d.ttft_slo_s, positive=True),
        itl_slo_s=r.number("itl_slo_s", d.itl_slo_s, positive=True),
        target_utilization=_fraction(r, "target_utilization", d.target_utilization),
        scale_down_utilization=_fraction(r, "scale_down_utilization", d.scale_down_utilization),
        kv_target=_fraction(r, "kv_target", d.kv_target),
        up_cooldown_s=r.number("up_cooldown_s", d.up_cooldown_s, minimum=0.0),
        down_cooldown_s=r.number("down_cooldown_s", d.down_cooldown_s, minimum=0.0),
        down_stable_s=r.number("down_stable_s", d.down_stable_s, minimum=0.0),
        max_step_up=r.integer("max_step_up", d.max_step_up, minimum=1),
        router_metrics_urls=tuple(urls),
        pools=_read_pools(r.section("pools"), pool_names),
        kubernetes=_read_kubernetes(r.section("kubernetes"), pool_names),
    )
    if out.scale_down_utilization >= out.target_utilization:
        raise ClusterConfigError(
            r.where("scale_down_utilization"), "must be below autoscaler.target_utilization (the gap is the hysteresis)"
        )
    if out.window_s < out.interval_s:
        raise ClusterConfigError(r.where("window_s"), "must be >= autoscaler.interval_s")
    r.finish()
    return out


def _check_pool_name(r: ConfigReader, name: str) -> None:
    if name not in _POOL_NAMES:
        raise ClusterConfigError(r.where(name), f"unknown pool; pools are {', '.join(_POOL_NAMES)}")


def _fraction(r: ConfigReader, key: str, default: float) -> float:
    value = r.number(key, default, positive=True)
    if value > 1.0:
        raise ClusterConfigError(r.where(key), f"must be in (0, 1], got {value}")
    return value


def _read_pools(r: ConfigReader, pool_names: tuple[str, ...]) -> dict[str, PoolScaling]:
    out: dict[str, PoolScaling] = {}
    for name in r.keys():
        section = r.section(name)
        if name not in pool_names:
            raise ClusterConfigError(section.path, f"no such pool in this cluster (pools: {', '.join(pool_names)})")
        d = PoolScaling()
        low = section.integer(
            "min_groups", d.min_groups, minimum=1
        )  # a pool with no group sends no signal: no scale from zero
        high = section.integer("max_groups", d.max_groups, minimum=1)
        if high < low:
            raise ClusterConfigError(section.where("max_groups"), f"must be >= min_groups ({low}), got {high}")
        out[name] = PoolScaling(low, high, section.optional_integer("max_seqs", minimum=1))
        section.finish()
    r.finish()
    return out


def _read_kubernetes(r: ConfigReader, pool_names: tuple[str, ...]) -> KubernetesScaling:
    d = KubernetesScaling()
    enabled = r.flag("enabled", d.enabled)
    raycluster = r.text("raycluster", d.raycluster)
    namespace = r.optional_text("namespace")
    # names of pools this cluster lacks are accepted (a config written by to_dict lists all three)
    groups = dict(d.worker_groups)
    for name in (section := r.section("worker_groups")).keys():
        _check_pool_name(section, name)
        groups[name] = section.text(name)
    section.finish()
    pods = dict(d.pods_per_group)
    for name in (section := r.section("pods_per_group")).keys():
        _check_pool_name(section, name)
        pods[name] = section.integer(name, minimum=1)
    section.finish()
    out = KubernetesScaling(enabled, raycluster, namespace, groups, pods, r.number("request_timeout_s", d.request_timeout_s, positive=True))  # fmt: skip
    r.finish()
    return out
