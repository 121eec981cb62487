"""The Grafana dashboards and Prometheus rules the Helm chart ships are well formed and use only the
series of ``docs/METRICS.md``.

No server: the JSON and YAML are checked as files, and every query's syntax by ``promtool`` (each
dashboard query, made concrete, becomes a recording rule of one temporary rules file). The promtool
tests skip when it is not installed, unless ``K2SERVE_REQUIRE_PROMETHEUS=1`` makes them fail.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboard_queries import (
    ALERTS_FILE,
    ALERTS_TEST_FILE,
    DEFAULT_VARIABLES,
    NEEDS,
    ROOT,
    alert_rules,
    concrete,
    dashboard_files,
    iter_panels,
    load_dashboard,
    panel_queries,
    prometheus_tool,
)
from prometheus_client.utils import floatToGoString

from k2serve.router.router_metrics import ITL_BUCKETS, TTFT_BUCKETS

METRICS_DOC = ROOT / "docs" / "METRICS.md"
EXPECTED_DASHBOARDS = (
    "k2serve-expert-parallelism",
    "k2serve-latency-slo",
    "k2serve-overview",
    "k2serve-pd-kv-transfer",
    "k2serve-per-rank",
)
PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "heatmap"}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
METRIC_NAME = re.compile(r"k2serve_[a-z0-9_]+")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
SEVERITIES = {"warning", "critical"}
RUNBOOK_URL = "https://github.com/k2serve/k2serve/blob/main/docs/OPERATIONS.md#alerts"


# ---------------------------------------------------------------------------------------------- helpers
def documented_metrics() -> dict[str, str]:
    """Series name → type ("counter", "gauge", "histogram") from the tables of docs/METRICS.md."""
    metrics: dict[str, str] = {}
    for line in METRICS_DOC.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3:
            continue
        kind = cells[1].split()[0] if cells[1] else ""
        for name in re.findall(r"`(k2serve_[a-z0-9_]+)", cells[0]):
            metrics[name] = kind
    return metrics


def undocumented_names(expr: str, documented: dict[str, str]) -> list[str]:
    """Names in ``expr`` that are not series of METRICS.md: histograms must carry a ``_bucket``/``_sum``/
    ``_count`` suffix, counters their ``_total``."""
    problems = []
    for name in METRIC_NAME.findall(expr):
        base = HISTOGRAM_SUFFIX.sub("", name)
        if base != name and documented.get(base) == "histogram":
            continue
        if documented.get(name, "histogram") != "histogram":
            continue
        problems.append(name)
    return problems


def dashboards() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, load_dashboard(path)) for path in dashboard_files()]


def variable(dashboard: dict[str, Any], name: str) -> dict[str, Any]:
    matches: list[dict[str, Any]] = [
        v for v in dashboard.get("templating", {}).get("list", []) if v.get("name") == name
    ]
    assert len(matches) == 1, f"{dashboard.get('uid')}: expected one ${name} variable, found {len(matches)}"
    return matches[0]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            queries.append(query["query"] if isinstance(query, dict) else str(query))
    return queries


@pytest.fixture(scope="module")
def promtool() -> str:
    return prometheus_tool("promtool")


def run_promtool(promtool: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def write_query_rules(path: Path, queries: dict[str, tuple[str, str]]) -> None:
    """``queries``: recording-rule name → (where, concrete PromQL); one group, one rule per query."""
    rules = [{"record": name, "expr": expr} for name, (_, expr) in queries.items()]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, sort_keys=False))


def check_queries(promtool: str, tmp_path: Path, queries: dict[str, tuple[str, str]]) -> str | None:
    """None when promtool accepts every query, else a message naming the offending panels."""
    rules_file = tmp_path / "dashboard-queries.yaml"
    write_query_rules(rules_file, queries)
    result = run_promtool(promtool, "check", "rules", str(rules_file))
    if result.returncode == 0:
        return None
    output = result.stdout + result.stderr
    offenders = sorted({name for name in re.findall(r"dashboard:[a-z0-9_]+:\w+", output) if name in queries})
    lines = [f"{queries[name][0]}: {queries[name][1]}" for name in offenders]
    return "promtool rejects dashboard queries:\n" + "\n".join(lines) + "\n\n" + output


def all_dashboard_queries() -> dict[str, tuple[str, str]]:
    queries: dict[str, tuple[str, str]] = {}
    for path, dashboard in dashboards():
        slug = path.stem.replace("-", "_")
        for i, (title, expr, _) in enumerate(panel_queries(dashboard)):
            queries[f"dashboard:{slug}:q{i}"] = (f"{path.name} / {title!r}", concrete(expr))
    return queries


# ---------------------------------------------------------------------------------------------- dashboards
def test_every_expected_dashboard_is_shipped() -> None:
    names = {path.stem for path in dashboard_files()}
    assert set(EXPECTED_DASHBOARDS) <= names


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.stem)
def test_dashboard_is_well_formed(path: Path) -> None:
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    assert dashboard["uid"] == path.stem
    assert dashboard["schemaVersion"] == 39
    assert "k2serve" in dashboard["tags"]
    assert dashboard["time"]["from"] == "now-15m"
    assert dashboard["refresh"] == "30s"
    datasource = variable(dashboard, "datasource")
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    model = variable(dashboard, "model_name")
    assert model["includeAll"] and model["allValue"] == ".*"
    assert "label_values(k2serve_router_requests_running, model_name)" in variable_queries(dashboard)

    panels = list(iter_panels(dashboard["panels"]))
    ids = Counter(panel["id"] for panel in panels)
    assert not [i for i, n in ids.items() if n > 1], f"duplicate panel ids: {ids}"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert set(pos) == {"h", "w", "x", "y"} and 0 <= pos["x"] < pos["x"] + pos["w"] <= 24, panel["title"]
        for cell in (
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        ):
            assert cell not in cells, f"{path.name}: {panel['title']!r} overlaps {cells[cell]!r}"
            cells[cell] = panel["title"]
        if panel["type"] == "row":
            continue
        where = f"{path.name} / {panel['title']!r}"
        assert panel["type"] in PANEL_TYPES, where
        assert panel["datasource"] == DATASOURCE_REF, where
        assert panel["targets"], f"{where} has no target"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), where
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE_REF, where
            assert target.get("expr", "").strip(), f"{where}: target {target['refId']} has no expr"
            assert target.get("k2serveNeeds") in (None, *NEEDS), where


def test_dashboard_uids_are_unique() -> None:
    uids = Counter(dashboard["uid"] for _, dashboard in dashboards())
    assert all(n == 1 for n in uids.values()), uids


@pytest.mark.parametrize(
    ("uid", "name", "buckets"),
    [("k2serve-latency-slo", "ttft_slo", TTFT_BUCKETS), ("k2serve-latency-slo", "itl_slo", ITL_BUCKETS)],
)
def test_slo_choices_are_bucket_bounds(uid: str, name: str, buckets: tuple[float, ...]) -> None:
    """``le="$ttft_slo"`` only matches when the value is spelled exactly like the exported ``le``."""
    dashboard = load_dashboard(ROOT / "helm" / "dashboards" / f"{uid}.json")
    slo = variable(dashboard, name)
    choices = slo["query"].split(",")
    assert set(choices) <= {floatToGoString(b) for b in buckets}, choices
    assert slo["current"]["value"] == DEFAULT_VARIABLES[name]
    assert f'le="${name}"' in "".join(expr for _, expr, _ in panel_queries(dashboard))


def test_dashboard_and_alert_series_are_documented() -> None:
    documented = documented_metrics()
    assert "k2serve_router_time_to_first_token_seconds" in documented  # the parser found the tables
    problems = []
    for path, dashboard in dashboards():
        for title, expr, _ in panel_queries(dashboard):
            problems += [f"{path.name} / {title!r}: {name}" for name in undocumented_names(expr, documented)]
        for query in variable_queries(dashboard):
            problems += [f"{path.name} / variable: {name}" for name in undocumented_names(query, documented)]
    for rule in alert_rules():
        where = rule.get("alert") or rule.get("record")
        problems += [f"{ALERTS_FILE.name} / {where}: {name}" for name in undocumented_names(rule["expr"], documented)]
    assert not problems, "series not in docs/METRICS.md:\n" + "\n".join(problems)


def test_concrete_queries_are_plain_promql() -> None:
    for _, dashboard in dashboards():
        for title, expr, _ in panel_queries(dashboard):
            leftover = re.findall(r"\$\{?[A-Za-z_]\w*", concrete(expr))
            assert not leftover, f"{title!r}: {leftover}"


def test_dashboard_queries_pass_promtool(promtool: str, tmp_path: Path) -> None:
    queries = all_dashboard_queries()
    assert queries
    problem = check_queries(promtool, tmp_path, queries)
    assert problem is None, problem


def test_a_broken_query_is_caught(promtool: str, tmp_path: Path) -> None:
    queries = all_dashboard_queries()
    broken = "dashboard:broken:q0"
    queries[broken] = ("broken.json / 'Broken panel'", "sum by(le (rate(k2serve_kv_transfer_seconds_bucket[1m]))")
    problem = check_queries(promtool, tmp_path, queries)
    assert problem is not None and "'Broken panel'" in problem, problem


# ---------------------------------------------------------------------------------------------- helper module
def test_concrete_substitutes_grafana_variables() -> None:
    expr = 'rate(x_bucket{model_name=~"${model_name}", pool=~"$pool", le="$ttft_slo"}[$__rate_interval])'
    assert concrete(expr) == 'rate(x_bucket{model_name=~".*", pool=~".*", le="2.5"}[1m])'
    assert concrete("increase(x_total[$__range])", {"__range": "1h"}) == "increase(x_total[1h])"
    label_replace = 'label_replace(up, "class", "${1}xx", "status", "(.)..")'
    assert concrete(label_replace) == label_replace
    with pytest.raises(KeyError):
        concrete("x{pool=~'$nonexistent'}")


def test_panel_queries_reads_collapsed_rows() -> None:
    dashboard = {
        "panels": [
            {"type": "stat", "title": "top", "targets": [{"expr": "a", "refId": "A"}]},
            {
                "type": "row",
                "title": "row",
                "collapsed": True,
                "panels": [
                    {"type": "timeseries", "title": "nested", "targets": [{"expr": "b", "k2serveNeeds": "failure"}]}
                ],
            },
        ]
    }
    assert panel_queries(dashboard) == [("top", "a", None), ("nested", "b", "failure")]


# ---------------------------------------------------------------------------------------------- alert rules
def test_alert_rules_pass_promtool(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", str(ALERTS_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", ALERTS_TEST_FILE.name, cwd=ALERTS_TEST_FILE.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_complete() -> None:
    alerts = [rule for rule in alert_rules() if "alert" in rule]
    assert len(alerts) >= 13
    for rule in alerts:
        name = rule["alert"]
        assert "for" in rule, name
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
        assert rule["annotations"]["runbook_url"] == RUNBOOK_URL, name
    names = Counter(rule["alert"] for rule in alerts)
    assert all(n == 1 for n in names.values()), names


def test_recording_rules_are_namespaced() -> None:
    records = [rule["record"] for rule in alert_rules() if "record" in rule]
    assert records
    assert all(re.fullmatch(r"k2serve:[a-z0-9_]+:[a-z0-9_]+", name) for name in records), records


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    document = yaml.safe_load(ALERTS_TEST_FILE.read_text(encoding="utf-8"))
    assert document["rule_files"] == [ALERTS_FILE.name]
    cases = [case for test in document["tests"] for case in test.get("alert_rule_test", [])]
    fired = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = [case["alertname"] for case in cases if not case.get("exp_alerts")]
    alerts = {rule["alert"] for rule in alert_rules() if "alert" in rule}
    assert alerts <= fired, f"alerts never made to fire: {sorted(alerts - fired)}"
    assert quiet, "no unit test checks that an alert stays quiet"
