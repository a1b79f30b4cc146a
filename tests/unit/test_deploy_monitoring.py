"""Prometheus rules and config, Grafana dashboard and provisioning: offline, without Prometheus or Grafana.

Every PromQL expression (alert rules, dashboard panels) is parsed by ``promql-parser`` (PyPI, a Rust
PromQL parser; ``dev`` extra), and each metric it selects must be one the gateway exports (read from
gateway/observability/metrics.py's own collectors), with labels that metric has. ``promtool`` (Prometheus' checker and
rule unit-test runner) is not on PyPI: its tests run where it is on PATH (Debian: package `prometheus`)
and are skipped elsewhere.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
# Series Prometheus makes itself, which rules may use beside the gateway's own.
PROMETHEUS_SERIES = {"up": set()}
TARGET_LABELS = {"job", "instance"}  # added by the scrape


def _exported() -> dict[str, set[str]]:
    """Sample name → label names, for everything the gateway's /metrics can show."""
    from prometheus_client.metrics import MetricWrapperBase

    from gateway.observability.metrics import GpuCollector, Metrics, engine_state_family, worker_families

    metrics = Metrics()
    # (family name, type, labels). prometheus_client keeps label names in `_labelnames` on both the
    # metric objects and the families; the families of labelled metrics carry no sample to read them from.
    families = [(m._name, m._type, m._labelnames) for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    for family in [engine_state_family(()), *GpuCollector(list).describe(), *worker_families(0, 0)]:
        families.append((family.name, family.type, family._labelnames))
    names: dict[str, set[str]] = {}
    for name, kind, labels in families:
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(kind, [""])
        for suffix in suffixes:
            names[name + suffix] = set(labels) | ({"le"} if suffix == "_bucket" else set())
    return names


EXPORTED = _exported()


def test_the_metric_names_the_deploy_files_rely_on_are_exported():
    assert {
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_engine_state",
        "gateway_engine_restarts_total",
        "gateway_queue_depth",
        "gateway_gpu_memory_used_bytes",
        "gateway_gpu_memory_total_bytes",
        "gateway_gpu_utilization_ratio",
    } <= set(EXPORTED)
    assert EXPORTED["gateway_engine_state"] == {"model", "replica", "state"}


def _check_promql(expr: str, where: str, *, allowed: dict[str, set[str]]) -> set[str]:
    """Parse; every selector names a known metric with its own labels; grouping uses labels that exist."""
    import promql_parser

    try:
        ast = promql_parser.parse(expr)
    except ValueError as exc:
        pytest.fail(f"{where}: PromQL does not parse: {exc}\n  {expr}")
    selectors: list[Any] = []
    groupings: list[list[str]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            groupings.append(list(node.modifier.labels))
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier and node.modifier.matching:
            groupings.append(list(node.modifier.matching.labels))

    promql_parser.walk(ast, visit)
    assert selectors, f"{where}: selects no metric: {expr}"
    seen_labels = set(TARGET_LABELS)
    for sel in selectors:
        assert sel.name, f"{where}: a selector without a metric name: {expr}"
        assert sel.name in allowed, f"{where}: {sel.name} is not a metric the gateway exports"
        labels = allowed[sel.name] | TARGET_LABELS
        seen_labels |= labels
        for matcher in sel.matchers.matchers:
            assert matcher.name in labels, f"{where}: {sel.name} has no label {matcher.name!r}"
    for group in groupings:
        assert set(group) <= seen_labels, f"{where}: groups by {sorted(set(group) - seen_labels)}: no such label"
    return {s.name for s in selectors}


# ------------------------------------------------------------------------------------------ alerts
ALERTS = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
RULES = [rule for group in ALERTS["groups"] for rule in group["rules"]]


def test_alert_rules_have_the_required_shape():
    assert ALERTS["groups"] and all(g["name"] and g["rules"] for g in ALERTS["groups"])
    names = [r["alert"] for r in RULES]
    assert len(names) == len(set(names)), "alert names are unique"
    for rule in RULES:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        if "for" in rule:
            import promql_parser

            assert promql_parser.parse_duration(rule["for"]).total_seconds() > 0


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r["alert"])
def test_alert_expression_parses_and_uses_exported_metrics(rule):
    _check_promql(rule["expr"], rule["alert"], allowed={**EXPORTED, **PROMETHEUS_SERIES})


def test_alerts_cover_what_operators_need():
    """Engine down, crash loop, FAILED, 5xx, queue, GPU memory: each has a rule over the right metric."""
    by_metric: dict[str, list[str]] = {}
    for rule in RULES:
        for name in _check_promql(rule["expr"], rule["alert"], allowed={**EXPORTED, **PROMETHEUS_SERIES}):
            by_metric.setdefault(name, []).append(rule["expr"])
    state = " ".join(by_metric["gateway_engine_state"])
    assert 'state="ready"' in state and 'state="failed"' in state
    restarts = by_metric["gateway_engine_restarts_total"]
    assert any("increase(gateway_engine_restarts_total[15m]) > 3" in e for e in restarts)
    workers = by_metric["gateway_worker_restarts_total"]
    assert any("increase(gateway_worker_restarts_total[15m]) > 3" in e for e in workers)
    assert any('status=~"5.."' in e for e in by_metric["gateway_requests_total"])
    assert by_metric["gateway_queue_depth"]
    gpu = by_metric["gateway_gpu_memory_used_bytes"]
    assert any("gateway_gpu_memory_total_bytes" in e and "0.95" in e for e in gpu)


def test_prometheus_config_loads_the_rules_and_scrapes_the_gateway():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).exists()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["gateway"].get("metrics_path", "/metrics") == "/metrics"
    # GatewayDown selects job="gateway": the job must be called that.
    assert any('job="gateway"' in r["expr"] for r in RULES)


def _promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool is not installed (not on PyPI; Debian package `prometheus`)")
    return found


@pytest.mark.parametrize(
    "args",
    [["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]],
    ids=" ".join,
)
def test_promtool(args):
    result = subprocess.run(
        [_promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------- dashboard
DASHBOARD = json.loads((GRAFANA / "dashboard.json").read_text())
# Grafana's built-in variables, replaced by what they stand for in a query so the parser sees PromQL.
BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "3h"}


def _panels() -> Iterator[dict[str, Any]]:
    for panel in DASHBOARD["panels"]:
        yield panel
        yield from panel.get("panels", [])  # inside collapsed rows


def _expand(expr: str, variables: set[str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in BUILTINS:
            return BUILTINS[name]
        assert name in variables, f"${name} is not a variable of the dashboard"
        return ".*"

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", sub, expr)


def test_dashboard_structure():
    assert DASHBOARD["uid"] and DASHBOARD["title"] and DASHBOARD["schemaVersion"] >= 36
    ids = [p["id"] for p in _panels()]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in _panels():
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"


def test_dashboard_queries_parse_and_use_exported_metrics():
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    used: set[str] = set()
    for panel in _panels():
        for target in panel.get("targets", []):
            expr = _expand(target["expr"], variables)
            used |= _check_promql(expr, f"panel {panel['title']!r}", allowed=EXPORTED)
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            assert m and m.group(1) in EXPORTED and m.group(2) in EXPORTED[m.group(1)], variable["name"]
    # The families the issue asks for are all on the dashboard.
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert {
        "gateway_requests",
        "gateway_request_duration_seconds",
        "gateway_time_to_first_token_seconds",
        "gateway_time_between_chunks_seconds",
        "gateway_requests_in_flight",
        "gateway_queue_depth",
        "gateway_upstream_errors",
        "gateway_tokens",
        "gateway_engine_restarts",
        "gateway_engine_startup_seconds",
        "gateway_engine_state",
        "gateway_gpu_memory_used_bytes",
        "gateway_gpu_memory_total_bytes",
        "gateway_gpu_utilization_ratio",
    } <= families


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/gateway.yml").read_text())
    assert provider["apiVersion"] == 1 and provider["providers"][0]["type"] == "file"
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert datasource["apiVersion"] == 1 and datasource["datasources"][0]["type"] == "prometheus"
