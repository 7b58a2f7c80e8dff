"""The Grafana dashboard and the Prometheus rules in deploy/grafana only use metrics a real server exports.

Both files are loaded as their consumers load them (JSON, YAML); every metric name in every PromQL expression must
appear in a real scrape (a single server's /metrics, and the supervisor's merged metrics for the `--workers` ones),
and every recording rule the dashboard or an alert uses must be defined.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from nnserve.server.metrics import MULTIPROC_ENV, AggregatedMetricsServer, MultiprocessWriter
from nnserve.server.statistics import FAILURE_REASONS
from tests.conftest import ROOT, RunningServer

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "nnserve-dashboard.json"
RULES = GRAFANA / "prometheus-rules.yaml"

# A metric name not glued to a recording rule's colons (level:metric:operation) or to another word.
METRIC = re.compile(r"(?<![\w:])((?:nnserve|process)_\w+)(?![\w:])")
RECORDED = re.compile(r"\b[a-z_]+:nnserve_\w+:\w+\b")
LABEL_VALUES = re.compile(r"label_values\((\w+)")


def expressions(node: Any) -> Iterator[str]:
    """Every `expr` (and templating query) anywhere in a JSON/YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def scraped_names(text: str) -> set[str]:
    return set(re.findall(r"^([a-zA-Z_][\w]*)(?:\{| )", text, re.MULTILINE))


@pytest.fixture(scope="module")
def exported(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Sample names of a real scrape, plus those only the supervisor of `--workers` exports."""
    port = server.app.metrics_port
    names = scraped_names(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    directory = tmp_path_factory.mktemp("multiproc")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MULTIPROC_ENV, str(directory))
        writer = MultiprocessWriter(server.app.metrics_state)

        async def flush() -> None:
            writer.flush()

        server.call(flush())
    aggregated = AggregatedMetricsServer(str(directory))
    try:
        merged = aggregated.start("127.0.0.1", 0)
        names |= scraped_names(urllib.request.urlopen(f"http://127.0.0.1:{merged}/metrics", timeout=5).read().decode())
    finally:
        aggregated.stop()
    return names


@pytest.fixture(scope="module")
def rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_rules_file_is_a_valid_prometheus_rules_file(rules: dict[str, Any]) -> None:
    assert set(rules) == {"groups"}
    records, alerts = [], []
    for group in rules["groups"]:
        assert group["name"]
        assert group["rules"]
        for rule in group["rules"]:
            assert ("record" in rule) != ("alert" in rule), rule
            assert isinstance(rule["expr"], str)
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["expr"]
            if "record" in rule:
                assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]
                records.append(rule["record"])
            else:
                assert rule["labels"]["severity"] in ("warning", "critical")
                assert rule["annotations"]["summary"]
                alerts.append(rule["alert"])
    assert len(records) == len(set(records))
    assert {"NnserveHighErrorRatio", "NnserveQueueSaturated", "NnserveModelNotReady", "NnserveCpuFallback",
            "NnserveInflightBudgetNearlyFull"} <= set(alerts)


def test_every_metric_the_rules_use_is_exported(rules: dict[str, Any], exported: set[str]) -> None:
    used = {name for expr in expressions(rules) for name in METRIC.findall(expr)}
    assert used
    assert used - exported == set()
    defined = {rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule}
    recorded = {name for expr in expressions(rules) for name in RECORDED.findall(expr)}
    assert recorded - defined == set()


def test_every_metric_and_recording_rule_the_dashboard_uses_exists(
    dashboard: dict[str, Any], rules: dict[str, Any], exported: set[str]
) -> None:
    exprs = list(expressions(dashboard))
    assert len(exprs) > 20
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    used |= {name for expr in exprs for name in LABEL_VALUES.findall(expr)}
    assert used - exported == set()
    defined = {rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule}
    recorded = {name for expr in exprs for name in RECORDED.findall(expr)}
    assert recorded
    assert recorded - defined == set()


def test_dashboard_shows_throughput_stage_quantiles_batch_size_queue_depth_and_errors(
    dashboard: dict[str, Any],
) -> None:
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    text = json.dumps(panels)
    for quantile in ("p50", "p95", "p99"):
        assert f"nnserve_request_stage_duration_seconds:{quantile}_5m" in text
        assert f"nnserve_request_duration_seconds:{quantile}_5m" in text
    for needed in ("rate(nnserve_requests_total", "nnserve_batch_size_rows", "nnserve_queue_depth",
                   'outcome!=\\"success\\"', "nnserve_model_provider_fallback"):
        assert needed in text, needed
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model", "version"} <= variables
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)


def test_every_rule_quantile_aggregates_buckets_by_le(rules: dict[str, Any]) -> None:
    for expr in expressions(rules):
        if "histogram_quantile" in expr:
            assert re.search(r"sum by \([^)]*\ble\b[^)]*\) \(rate\(\w+_bucket\[5m\]\)\)", expr), expr


def test_the_errors_panel_names_every_outcome_and_the_budget_is_on_the_dashboard_and_alerted(
    dashboard: dict[str, Any], rules: dict[str, Any]
) -> None:
    errors = next(p for p in dashboard["panels"] if p.get("title") == "Errors by reason")
    assert all(reason in errors["description"] for reason in FAILURE_REASONS), errors["description"]
    text = json.dumps(dashboard["panels"])
    for needed in ("nnserve_inflight_bytes{", "nnserve_inflight_bytes_limit{", 'outcome=\\"over_budget\\"'):
        assert needed in text, needed
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    assert "instance:nnserve_inflight_bytes_utilisation:ratio" in alerts["NnserveInflightBudgetNearlyFull"]["expr"]
    assert "over_budget" in alerts["NnserveRequestsRejected"]["expr"]
