"""Ray composition root: cluster config, Ray runtime, worker actors, controller, registry (DESIGN.md §2).

- ``config`` / ``pool_config`` / ``config_reader`` / ``config_error``: ``ClusterConfig`` from one YAML file.
- ``ray_runtime``: start an embedded local Ray (token auth on) or connect to a cluster.
- ``worker_actor``: ``WorkerActor``, one rank of an expert-parallel group in a Ray actor.
- ``worker_group`` / ``placement`` / ``rank_plan`` / ``health_probe`` / ``restart_policy``: one group's
  placement group, actors, start, health and stop; what each rank runs; back-off.
- ``controller`` / ``group_slot`` / ``controller_handle``: the ``Controller`` actor (desired vs live state), its record
  of each group, and its driver API.
- ``registry`` / ``registry_client`` / ``worker_record``: the ``Registry.Watch`` gRPC stream of the live set.
- ``autoscaler`` / ``autoscaler_settings`` / ``autoscaler_metrics``: the controller's queue-aware pool scaling
  loop; ``metric_window`` / ``pool_signals`` (windowed signals per pool) and ``scale_policy`` (the decision);
  ``raycluster_scaler``: the Kubernetes side (KubeRay worker-group replicas).
- ``planner``: ``k2serve plan``'s roofline capacity planner (pure arithmetic).

Ray is imported only inside this package (DESIGN.md §3).
"""
