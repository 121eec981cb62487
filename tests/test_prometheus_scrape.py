"""A real Prometheus (Debian's package) scrapes a running ``k2serve serve --demo`` and every dashboard query
returns data.

The demo is the disaggregated layout with expert parallelism (one prefill and one decode group of
EP=2), so the router, four ranks (prefill and decode, each with all-to-all) and the controller are
all scraped: the router as a static target, everything else through the router's
``/metrics/targets`` (HTTP service discovery). The alert rules the chart ships are loaded too. After
a burst of traffic every query of every dashboard in helm/dashboards is evaluated through
Prometheus' HTTP API; only the queries tagged ``failure`` (restarts, a failed engine) may be empty.
Skipped where no ``prometheus`` binary is installed, unless ``K2SERVE_REQUIRE_PROMETHEUS=1`` (CI).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dashboard_queries import concrete, dashboard_files, load_dashboard, panel_queries, prometheus_tool
from serve_process import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "helm" / "files" / "k2serve-alerts.yaml"
START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _until(what: str, check: Any, timeout_s: float, every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g}s waiting for {what}"
        time.sleep(every_s)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("demo")
    serving = ServeProcess.start(["serve", "--demo", "--demo-dir", str(root / "model")], root)
    try:
        yield serving
    finally:
        serving.stop()


@pytest.fixture(scope="module")
def prometheus(demo: ServeProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = prometheus_tool("prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    router = demo.url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "k2serve-router", "static_configs": [{"targets": [router]}]},
            {
                "job_name": "k2serve-workers",
                "http_sd_configs": [{"url": f"{demo.url}/metrics/targets", "refresh_interval": "1s"}],
            },
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address={address}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(root / "prometheus.log").open("w"),
    )
    url = f"http://{address}"
    try:
        _until("Prometheus to be ready", lambda: _ok(f"{url}/-/ready"), START_TIMEOUT_S)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _targets(prometheus: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"])


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return list(answer["data"]["result"])


def _traffic(url: str, requests: int) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(requests):
            body = {
                "model": client.get("/v1/models").json()["data"][0]["id"],
                "messages": [{"role": "user", "content": f"question number {i} about the weather"}],
                "max_tokens": 6,
                "temperature": 0,
                "ignore_eos": True,
                "stream": i % 2 == 0,
            }
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def scraped(demo: ServeProcess, prometheus: str) -> str:
    """Prometheus after every target is up and a burst of traffic has been scraped twice."""

    def all_up() -> bool:
        targets = _targets(prometheus)
        roles = {t["labels"].get("role") for t in targets}
        ready = {"prefill", "decode", "controller"} <= roles and len(targets) >= 6  # router, 4 ranks, controller
        return ready and all(t["health"] == "up" for t in targets)

    _until("every k2serve target to be up", all_up, 60.0)
    _traffic(demo.url, 8)
    time.sleep(3.0)  # two scrapes after the last request
    _traffic(demo.url, 2)  # rates need two samples with traffic between them inside the window
    time.sleep(3.0)
    return prometheus


def test_prometheus_discovers_every_rank_and_the_controller_through_the_router(scraped: str) -> None:
    targets = _targets(scraped)
    workers = sorted(t["labels"]["worker"] for t in targets if "worker" in t["labels"])
    assert workers == ["decode-g0-r0", "decode-g0-r1", "prefill-g0-r0", "prefill-g0-r1"]
    assert all(t["health"] == "up" for t in targets), [(t["scrapeUrl"], t["lastError"]) for t in targets]
    ranks_ready = {r["metric"]["pool"]: float(r["value"][1]) for r in _query(scraped, "k2serve_pool_ranks_ready")}
    assert ranks_ready == {"prefill": 2.0, "decode": 2.0}


def test_every_dashboard_query_returns_data(scraped: str) -> None:
    empty, checked = [], 0
    for path in dashboard_files():
        for title, expr, needs in panel_queries(load_dashboard(path)):
            if needs == "failure":
                continue  # restarts and failed engines: only after a fault (the fault tests cover them)
            checked += 1
            if not _query(scraped, concrete(expr)):
                empty.append(f"{path.name} / {title}: {concrete(expr)}")
    assert checked > 20
    assert not empty, "queries with no data:\n" + "\n".join(empty)


def test_the_alert_rules_load_and_none_fires_on_a_healthy_cluster(scraped: str) -> None:
    def evaluated() -> list[dict[str, Any]]:
        groups = httpx.get(f"{scraped}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else []

    rules = _until("every rule group to be evaluated once", evaluated, 45.0, every_s=1.0)
    alerting = [r for r in rules if r["type"] == "alerting"]
    assert alerting and all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    firing = [r["name"] for r in alerting if r["state"] == "firing"]
    assert not firing
