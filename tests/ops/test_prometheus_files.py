"""
deploy/prometheus/ read against the hub: every alert rule and every Grafana panel queries metrics that /metrics
really exposes, each alert says how bad it is and what to do, and each has promtool unit tests that fire it and
that must not. promtool itself checks the files' syntax and runs those unit tests (scripts/check-alerts.sh).
"""

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.ops.conftest import browser, make_server

pytestmark = pytest.mark.django_db

PROMETHEUS = Path(__file__).resolve().parent.parent.parent / "deploy" / "prometheus"
METRIC = re.compile(r"\b(comfyhub_[a-z0-9_]+|up)\b(?!\s*\()")  # `up` as a metric, never a function
# Prometheus' own series of each target.
SCRAPE_SERIES = {"up"}


def alert_rules():
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs():
    """(panel title, expr) of every query of every panel, rows' folded panels included."""
    dashboard = json.loads((PROMETHEUS / "grafana" / "comfyhub-pool.json").read_text())
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return [(panel["title"], target["expr"]) for panel in panels for target in panel.get("targets", [])]


def metrics_in(expr):
    return set(METRIC.findall(expr))


@pytest.fixture
def exposed(operator):
    """The sample names a scrape of /metrics can carry, read from the families (and types) of a real page."""
    make_server("gpu-a")
    reply = browser(operator).get("/metrics")
    assert reply.status_code == 200
    names = set()
    for family in text_string_to_metric_families(reply.content.decode()):
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}_{part}" for part in ("bucket", "sum", "count"))
        else:
            names.add(family.name)
    return names


def test_every_alert_reads_metrics_the_hub_exposes(exposed):
    for rule in alert_rules():
        named = metrics_in(rule["expr"])
        assert named, f"{rule['alert']} names no metric: {rule['expr']}"
        unknown = named - exposed - SCRAPE_SERIES
        assert not unknown, f"{rule['alert']} reads {sorted(unknown)}, which /metrics does not expose"


def test_every_dashboard_panel_queries_metrics_the_hub_exposes(exposed):
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    for title, expr in exprs:
        named = metrics_in(expr)
        assert named, f"panel {title!r} names no metric: {expr}"
        unknown = named - exposed - SCRAPE_SERIES
        assert not unknown, f"panel {title!r} queries {sorted(unknown)}, which /metrics does not expose"


def test_the_dashboard_covers_the_pool():
    shown = set().union(*(metrics_in(expr) for _, expr in dashboard_exprs()))
    for metric in [
        "comfyhub_servers",
        "comfyhub_server_state",
        "comfyhub_tasks",
        "comfyhub_oldest_queued_task_age_seconds",
        "comfyhub_task_queue_wait_seconds_bucket",
        "comfyhub_task_run_seconds_bucket",
        "comfyhub_workers",
        "comfyhub_server_leased",
        "comfyhub_webhook_deliveries",
        "comfyhub_webhook_deliveries_failed_recent",
        "comfyhub_storage_used_bytes",
        "comfyhub_storage_user_max_quota_ratio",
        "up",
    ]:
        assert metric in shown, metric


def test_every_alert_says_how_bad_it_is_and_what_to_do():
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "two alerts share a name"
    # What an operator acts with: a command, a button or page of the hub, or a unit.
    action = re.compile(r"manage\.py|systemctl|/ops/|admin|Drain|Probe|Send again|COMFYHUB_")
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        summary, description = rule["annotations"]["summary"], rule["annotations"]["description"]
        assert summary and len(description) > 100, rule["alert"]
        assert action.search(description), f"{rule['alert']}'s description names nothing to do"


def test_every_alert_has_unit_tests_that_fire_it_and_that_must_not():
    suite = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    assert suite["rule_files"] == ["alerts.yml"]
    fired, quiet = set(), set()
    for case in suite["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set(), "no unit test fires these"
    assert names - quiet == set(), "no unit test checks these stay quiet"


def test_the_scrape_config_reads_every_web_process_with_the_token_and_loads_the_rules():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "comfyhub"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "comfyhub-metrics-token"}
    [targets] = [group["targets"] for group in job["static_configs"]]
    # The Daphne processes themselves (comfyhub-web@N on 127.0.0.1:800N), so that `up` is per process.
    assert targets == ["127.0.0.1:8001", "127.0.0.1:8002"]

