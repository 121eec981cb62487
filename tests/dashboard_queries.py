"""Read the PromQL that the Helm chart ships: Grafana dashboards and Prometheus alert rules.

Not a test module: ``tests/test_dashboards.py`` imports it to check the queries offline (metric
names against ``docs/METRICS.md``, syntax with ``promtool``), and a live check can import it to run
every dashboard query against a Prometheus that scraped a k2serve deployment:

    for title, expr, needs in panel_queries(dashboard):
        query(concrete(expr))  # ``needs`` is None, "disaggregated", "expert_parallel" or "failure"

A target's ``needs`` (its ``k2serveNeeds`` field) names the only situation in which the query can
return data: a disaggregated deployment (KV transfer, leases), an expert-parallel group of two or
more ranks (``k2serve_ep_*``, ``k2serve_expert_tokens_total``), or a failure (restarts, a failed
engine). A target without it returns data once k2serve has served a few requests in any mode.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = ROOT / "helm" / "dashboards"
ALERTS_FILE = ROOT / "helm" / "files" / "k2serve-alerts.yaml"
ALERTS_TEST_FILE = ROOT / "helm" / "files" / "k2serve-alerts_test.yaml"

NEEDS = ("disaggregated", "expert_parallel", "failure")

# Grafana's built-in interval variables and the dashboards' own variables, as plain PromQL. The SLO
# values are the dashboards' defaults, spelled as the exporter writes the ``le`` label.
DEFAULT_VARIABLES: Mapping[str, str] = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "5m",
    "model_name": ".*",
    "pool": ".*",
    "worker": ".*",
    "ttft_slo": "2.5",
    "itl_slo": "0.1",
}

# ``$name``, ``${name}`` or ``${name:format}``; ``${1}`` / ``$1`` are label_replace references, not variables.
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)")


def prometheus_tool(name: str) -> str:
    """The path of Debian's ``prometheus`` or ``promtool``; skips the test where it is missing, fails
    instead when ``K2SERVE_REQUIRE_PROMETHEUS=1`` (CI installs the package)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("K2SERVE_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"{name} is not on PATH and K2SERVE_REQUIRE_PROMETHEUS=1")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return path


def dashboard_files() -> list[Path]:
    """Every dashboard the chart ships, sorted by name."""
    return sorted(DASHBOARD_DIR.glob("*.json"))


def load_dashboard(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return dashboard


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, depth first, including rows and the panels nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(panel title, expr, needs) for every target of every panel, nested rows included."""
    return [
        (panel.get("title", ""), target["expr"], target.get("k2serveNeeds"))
        for panel in iter_panels(dashboard.get("panels", []))
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def concrete(expr: str, variables: dict[str, str] | None = None) -> str:
    """``expr`` with every Grafana variable replaced, i.e. plain PromQL.

    ``variables`` adds to or overrides ``DEFAULT_VARIABLES``. An unknown variable name raises
    ``KeyError``, so a typo in a dashboard is caught; numeric references (``${1}`` in
    ``label_replace``) are left alone, as Grafana leaves them.
    """
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name.isdigit():
            return match.group(0)
        if name not in values:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(substitute, expr)


def alert_rules() -> list[dict[str, Any]]:
    """Every rule (alerting and recording) of ``helm/files/k2serve-alerts.yaml``, with its group's name
    under ``group``."""
    document = yaml.safe_load(ALERTS_FILE.read_text(encoding="utf-8"))
    return [{**rule, "group": group["name"]} for group in document["groups"] for rule in group["rules"]]
