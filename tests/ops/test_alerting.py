"""
The shipped alerting against a real Prometheus: a hub (`manage.py serve`, its supervisor inside) following two
simulated ComfyUI servers, each a `python -m comfysim` process of its own so that one can die, and Debian's
`/usr/bin/prometheus` scraping the hub's /metrics every second with deploy/prometheus/alerts.yml loaded.

The one change from the shipped rules: every `for:` is 3 s instead of minutes. The scrape config is the shipped
prometheus.yml with its intervals at 1 s and its target the hub under test; the token reaches it the way the
shipped one expects, in comfyhub-metrics-token beside it. Then a simulator is killed and the test waits for
ComfyhubServerOffline to fire for that server (and only for it), having seen it quiet while both were up. On
the way it checks that every shipped rule loads and evaluates, and that the Grafana panels' queries run.

Prometheus missing is a failure, not a skip: scripts/check-alerts.sh (run by .ci/run as root) installs it.
"""

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from comfyhub.harness import free_port
from tests.deployment_layout import Layout
from tests.ops.test_prometheus_files import dashboard_exprs

ROOT = Path(__file__).resolve().parent.parent.parent
SHIPPED = ROOT / "deploy" / "prometheus"
FOR = "3s"  # every rule's `for:`, shortened from the shipped minutes
TOKEN = secrets.token_urlsafe(32)


def prometheus_binary():
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not os.access(binary, os.X_OK):
        pytest.fail(
            "Prometheus is not installed (no prometheus on PATH, no /usr/bin/prometheus): install Debian's "
            "prometheus package (`apt-get install prometheus`, or run scripts/check-alerts.sh as root)"
        )
    return binary


def quick_rules():
    """alerts.yml with every `for:` set to FOR; nothing else changes."""
    text = (SHIPPED / "alerts.yml").read_text()
    rules = len(re.findall(r"^\s+- alert: ", text, flags=re.MULTILINE))
    quick, changed = re.subn(r"^(\s+for:) \S+$", rf"\1 {FOR}", text, flags=re.MULTILINE)
    assert changed == rules, "every shipped alert has a for: duration"
    return quick


def scrape_config(hub_port):
    """The shipped prometheus.yml, scraping the hub under test every second."""
    config = yaml.safe_load((SHIPPED / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{hub_port}"], "labels": {"host": "test"}}]
    return yaml.safe_dump(config)


def read(url, **kwargs):
    """The body of a 200 answer from `url`, or "" (refused, an error status, too slow)."""
    try:
        reply = httpx.get(url, timeout=2, **kwargs)
    except httpx.HTTPError:
        return ""
    return reply.text if reply.status_code == 200 else ""


class Prometheus:
    def __init__(self, base):
        self.base = base

    def get(self, path, **params):
        reply = httpx.get(f"{self.base}{path}", params=params, timeout=5)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr):
        return self.get("/api/v1/query", query=expr)["result"]

    def alerts(self, name):
        return [alert for alert in self.get("/api/v1/alerts")["alerts"] if alert["labels"]["alertname"] == name]


def test_a_real_prometheus_fires_server_offline_for_the_simulator_that_died(tmp_path):
    binary = prometheus_binary()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE")},
        "DATABASE_URL": f"sqlite:///{tmp_path / 'hub.sqlite3'}",
        "MEDIA_ROOT": str(tmp_path / "media"),
        "COMFYHUB_VAR_DIR": str(tmp_path / "var"),
        "COMFYHUB_METRICS_TOKEN": TOKEN,
        "COMFYHUB_PROBE_INTERVAL": "0.5",
    }
    layout = Layout(env, tmp_path)
    try:
        sims = {}
        for name in ("sim-1", "sim-2"):
            port = free_port()
            sims[name] = (
                layout.start(name, [sys.executable, "-m", "comfysim", "--port", str(port), "--name", name]),
                f"http://127.0.0.1:{port}",
            )
        for name, (_, url) in sims.items():
            layout.wait(lambda url=url: read(f"{url}/system_stats"), f"{name} to listen")
        setup = "; ".join(
            [
                "from django.core.management import call_command",
                "call_command('migrate', verbosity=0)",
                *(f"call_command('add_server', {name!r}, {url!r})" for name, (_, url) in sims.items()),
            ]
        )
        done = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", setup],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

        hub_port = free_port()
        layout.start("serve", [sys.executable, "manage.py", "serve", "--port", str(hub_port)])
        metrics = f"http://127.0.0.1:{hub_port}/metrics"

        def both_online():
            text = read(metrics, headers={"Authorization": f"Bearer {TOKEN}"})
            return all(f'comfyhub_server_state{{server="{name}",state="online"}} 1.0' in text for name in sims)

        layout.wait(both_online, "the hub to see both simulators online", timeout=60)

        config = tmp_path / "prometheus"
        config.mkdir()
        (config / "alerts.yml").write_text(quick_rules())
        (config / "prometheus.yml").write_text(scrape_config(hub_port))
        (config / "comfyhub-metrics-token").write_text(TOKEN)
        prom_port = free_port()
        layout.start(
            "prometheus",
            [
                binary,
                f"--config.file={config / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
        )
        prometheus = Prometheus(f"http://127.0.0.1:{prom_port}")
        layout.wait(lambda: read(f"{prometheus.base}/-/ready"), "Prometheus to be ready", timeout=30)
        layout.wait(lambda: prometheus.query('up{job="comfyhub"} == 1'), "Prometheus to scrape the hub")
        layout.wait(
            lambda: len(prometheus.query('comfyhub_server_state{state="online"} == 1')) == 2,
            "Prometheus to see both servers online",
        )

        # Quiet while both are up, for longer than a `for:` and over several evaluations of the rules.
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 5:
            assert prometheus.alerts("ComfyhubServerOffline") == [], "fired while both servers were up"
            time.sleep(0.5)
        # Every shipped rule loaded and evaluated without an error.
        shipped = {rule["alert"] for group in yaml.safe_load(quick_rules())["groups"] for rule in group["rules"]}
        loaded = {rule["name"]: rule for group in prometheus.get("/api/v1/rules")["groups"] for rule in group["rules"]}
        assert set(loaded) == shipped
        never = "0001-01-01T00:00:00Z"  # Go's zero time: not evaluated yet
        assert [rule for rule in loaded.values() if rule["health"] != "ok" or rule["lastEvaluation"] == never] == []
        # And the Grafana panels' queries are PromQL this Prometheus runs.
        for _, expr in dashboard_exprs():
            prometheus.query(expr)

        dying, _ = sims["sim-1"]
        dying.process.kill()
        dying.stop()
        layout.processes.remove(dying)  # it is meant to be gone: layout.wait would take it for a crash

        def fired():
            alerts = prometheus.alerts("ComfyhubServerOffline")
            return alerts if any(alert["state"] == "firing" for alert in alerts) else None

        [alert] = layout.wait(fired, "ComfyhubServerOffline to fire for sim-1", timeout=60, interval=0.5)
        assert alert["labels"] == {"alertname": "ComfyhubServerOffline", "server": "sim-1", "severity": "warning"}
        assert alert["annotations"]["summary"] == "ComfyUI server sim-1 has been offline for 5 minutes"
        assert "manage.py check_consistency --server sim-1" in alert["annotations"]["description"]
    finally:
        layout.stop_all()
