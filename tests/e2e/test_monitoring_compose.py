"""Prometheus and Grafana in the compose demo, checked without a Docker engine: Prometheus scrapes the ports the
coordinator and the workers really serve; Grafana's provisioning points at that Prometheus and loads the
dashboard; every metric a dashboard query names is one the exporters really export (read from live exporters
fed a round's events, parsed by ``prometheus_client.parser``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from fedlink.server.config import load_config
from fedlink.server.prometheus import CoordinatorMetrics
from fedlink.worker.prometheus import WorkerMetrics

from ..metrics_text import read_registry
from .test_compose import COMPOSE_FILE, Service, _config_source, coordinator_params, worker_params

REPO = COMPOSE_FILE.parent
DASHBOARDS = REPO / "docker" / "grafana" / "dashboards"

# PromQL's own words: functions, aggregations, modifiers; anything else in a query must be a metric or a label.
PROMQL = {
    "rate", "irate", "increase", "sum", "avg", "max", "min", "count", "by", "without", "on", "ignoring", "group_left",
    "group_right", "histogram_quantile", "topk", "bottomk", "abs", "clamp_min", "clamp_max", "delta", "deriv",
    "avg_over_time", "max_over_time", "min_over_time", "last_over_time", "and", "or", "unless", "offset", "bool",
    "label_replace", "vector", "scalar", "time", "resets", "changes",
}
BUILTIN_METRICS = {"up", "scrape_duration_seconds"}  # written by Prometheus itself for every target
TARGET_LABELS = {"job", "instance", "le"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Service]:
    return {name: Service(name, spec) for name, spec in compose["services"].items()}


def _bind_source(service: Service, target: str) -> Path:
    """The repository file or folder mounted read-only at ``target`` in ``service``."""
    mount = service.mount_of(target)
    assert not mount.is_volume and mount.read_only, f"{service.name}: mount {target} read-only from the repository"
    return mount.host_path({}).joinpath(*PurePosixPath(target).relative_to(mount.target).parts)


def _flag(command: list[str], name: str, default: str) -> str:
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}=")]
    return values[-1] if values else default


def _scrape_targets(services: dict[str, Service]) -> dict[str, set[tuple[str, int]]]:
    prometheus = services["prometheus"]
    config_path = _flag(prometheus.command, "--config.file", "/etc/prometheus/prometheus.yml")
    config = yaml.safe_load(_bind_source(prometheus, config_path).read_text(encoding="utf-8"))
    jobs: dict[str, set[tuple[str, int]]] = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics" and job.get("scheme", "http") == "http"
        targets = {t for static in job["static_configs"] for t in static["targets"]}
        jobs[job["job_name"]] = {(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in targets}
    return jobs


def test_prometheus_scrapes_what_the_services_serve(services: dict[str, Service]) -> None:
    jobs = _scrape_targets(services)
    coordinator = next(s for s in services.values() if s.spec.get("command", [None])[:2] == ["fl-coordinator", "train"])
    config = load_config(_config_source(coordinator))
    assert config.metrics is not None, "the demo's coordinator serves metrics"
    assert config.metrics.host == "0.0.0.0", "reachable from the Prometheus container"
    assert jobs["fedlink-coordinator"] == {(coordinator.name, config.metrics.port)}
    assert coordinator_params(coordinator.command)["config_path"], "the coordinator runs that config"

    workers = {name: s for name, s in services.items() if s.spec.get("command", [None])[0] == "fl-worker"}
    served = set()
    for name, service in workers.items():
        params = worker_params(service.command)
        assert params["metrics_port"] is not None, f"{name} serves no metrics"
        assert params["metrics_host"] == "0.0.0.0", f"{name}: metrics must be reachable from the Prometheus container"
        served.add((name, params["metrics_port"]))
    assert jobs["fedlink-workers"] == served, "every worker is scraped, on the port it serves"


def test_ports_are_published_on_loopback_only(services: dict[str, Service]) -> None:
    prometheus_port = int(_flag(services["prometheus"].command, "--web.listen-address", ":9090").rsplit(":", 1)[1])
    for name, port in (("prometheus", prometheus_port), ("grafana", 3000)):
        published = services[name].spec["ports"]
        assert published == [f"127.0.0.1:{port}:{port}"], f"{name}: publish {port} on the host's loopback, not {published}"


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard(services: dict[str, Service]) -> None:
    grafana = services["grafana"]
    assert "prometheus" in grafana.spec["depends_on"]
    provisioning = _bind_source(grafana, "/etc/grafana/provisioning")
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text(encoding="utf-8"))["datasources"]
    assert len(sources) == 1 and sources[0]["type"] == "prometheus"
    url = urlsplit(sources[0]["url"])
    prometheus_port = int(_flag(services["prometheus"].command, "--web.listen-address", ":9090").rsplit(":", 1)[1])
    assert (url.hostname, url.port) == ("prometheus", prometheus_port), "the datasource is the compose Prometheus"
    providers = yaml.safe_load((provisioning / "dashboards" / "fedlink.yml").read_text(encoding="utf-8"))["providers"]
    folder = providers[0]["options"]["path"]
    assert _bind_source(grafana, folder) == DASHBOARDS, "the provider loads the mounted dashboards folder"
    home = grafana.spec["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _bind_source(grafana, home).is_file()
    for board in DASHBOARDS.glob("*.json"):
        uids = {t["datasource"]["uid"] for p in json.loads(board.read_text())["panels"] for t in p["targets"]}
        assert uids == {sources[0]["uid"]}, f"{board.name} queries a datasource that is not provisioned: {uids}"


def _exported() -> tuple[set[str], set[str]]:
    """Sample names and label names of both exporters after a round's worth of events."""
    coordinator = CoordinatorMetrics()
    coordinator.run_started("job", 3, ["ws://w1"])
    coordinator.worker_connected("w1")
    coordinator.worker_status(1, "w1", "done", "loss 0.3")
    coordinator.stage_finished(1, "train", 0.5, [])
    coordinator.round_finished({"round": 1, "accuracy": 0.9, "loss": 0.3, "train_loss": 0.4, "epsilon": 0.5,
                                "workers": 1, "selected": 1, "samples": 10, "seconds": 1.0, "round_seconds": 0.9})
    worker = WorkerMetrics(worker_id="w1", version="0", samples=10)
    worker.job_started("train")
    worker.job_finished("train", "ok", 0.4)
    names, labels = set(), set()
    for registry in (coordinator.registry, worker.registry):
        for name, pairs in read_registry(registry):
            names.add(name)
            labels.update(key for key, _ in pairs)
    return names, labels


def _identifiers(expr: str) -> set[str]:
    """Every bare word of a PromQL expression: strings, label values, durations and numbers removed."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    return set(re.findall(r"\b[a-zA-Z_][a-zA-Z0-9_]*\b", expr))


def test_every_dashboard_query_names_exported_metrics() -> None:
    names, labels = _exported()
    boards = sorted(DASHBOARDS.glob("*.json"))
    assert boards, "no dashboard"
    titles = []
    for board in boards:
        for panel in json.loads(board.read_text(encoding="utf-8"))["panels"]:
            titles.append(panel["title"].lower())
            assert panel["targets"], f"{panel['title']}: no query"
            for target in panel["targets"]:
                for word in _identifiers(target["expr"]) - PROMQL - BUILTIN_METRICS:
                    if word in labels or word in TARGET_LABELS:
                        continue
                    assert word in names, f"{board.name} / {panel['title']}: {word!r} is not exported ({target['expr']})"
    for topic in ("accuracy", "loss", "round time", "worker health", "bytes", "drops"):
        assert any(topic in title for title in titles), f"the dashboard has no {topic} panel"


def test_a_misspelt_metric_is_caught() -> None:
    names, labels = _exported()
    words = _identifiers('sum by (reason) (increase(fedlink_workers_dropped_totl{reason="deadline"}[5m]))')
    assert words - PROMQL - BUILTIN_METRICS - labels - names == {"fedlink_workers_dropped_totl"}
