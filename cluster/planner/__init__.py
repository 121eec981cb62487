"""Capacity planning for Kimi K2 deployments (issue 10): a roofline, a layout search, published checks.

- ``model_spec``: parameters, bytes and FLOPs of a DeepSeek-V3-architecture model (presets, config.json).
- ``hardware``: GPU presets (H100, H200, H800, B200) and the ``Efficiency`` achieved on each peak.
- ``roofline``: memory, decode step, prefill rate and the binding resource of one GPU.
- ``planner``: the feasible layouts of N GPUs (two pools or colocated), best first.
- ``calibration``: efficiencies from measured figures.
- ``published``: published deployments and the planner's prediction of each.
- ``plan_report``: text and JSON views.
- ``deployment``: one layout as the chart's values or a cluster YAML.

Pure arithmetic: no Ray, no torch; ``k2serve plan`` is the entry point.
"""
