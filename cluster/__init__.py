"""Ray composition root: cluster config, placement, worker actors, controller, registry.

Ray is imported only inside this package (DESIGN.md §3); the Ray pools arrive with the cluster issue.
"""
