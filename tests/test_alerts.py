"""The Prometheus rules (deploy/prometheus/rules.yml): promtool's checks and unit tests, a real Prometheus loading
them, the metrics and error codes they read, their runbook, and the same rules in compose and Kubernetes."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.errors import STATUS
from tests.fixtures.prometheus import PROMETHEUS
from tests.helpers import REPO_ROOT, poll_readyz, start_server
from tools.harness import free_port

RULES = REPO_ROOT / "deploy" / "prometheus" / "rules.yml"
CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
UNIT_TESTS = REPO_ROOT / "tests" / "prometheus" / "rules_test.yml"
RUNBOOK = REPO_ROOT / "docs" / "alerts.md"
MONITORING = REPO_ROOT / "deploy" / "kubernetes" / "monitoring"
DEPLOYMENT = REPO_ROOT / "deploy" / "kubernetes" / "deployment.yaml"
COMPOSE = REPO_ROOT / "docker-compose.yml"
JOB = "pet-classifier"


def groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def rules() -> list[dict]:
    return [rule for group in groups() for rule in group["rules"]]


def alerts() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


def run_promtool(promtool: Path, *arguments) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *map(str, arguments)], capture_output=True, text=True, timeout=120)


# promtool


def test_promtool_checks_the_rules_and_the_compose_config(promtool):
    checked = run_promtool(promtool, "check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout
    config = run_promtool(promtool, "check", "config", CONFIG)
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout


def test_promtool_unit_tests_pass(promtool):
    result = run_promtool(promtool, "test", "rules", UNIT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_silent():
    cases = [case for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for alert in alerts():
        mine = [case for case in cases if case["alertname"] == alert["alert"]]
        assert any(case.get("exp_alerts") for case in mine), f"no unit test expects {alert['alert']} to fire"
        assert any(not case.get("exp_alerts") for case in mine), f"no unit test expects {alert['alert']} silent"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("route:petclf_request_duration_seconds:p99_5m > 2.5", "route:petclf_request_duration_seconds:p99_5m > 25"),
        ('status=~"5.."', 'status=~"4.."'),
        ("petclf:queue_full:ratio_rate5m > 0.01", "petclf:queue_full:ratio_rate5m > 0.001"),
        ("instance:petclf_queue_fill:ratio > 0.8", "instance:petclf_queue_fill:ratio > 0.3"),
        ("(petclf:ready_workers:sum or vector(0)) < 1", "petclf:ready_workers:sum < 1"),
        ('up{job="pet-classifier"} == 0', "up == 0"),
        ("(rate(petclf_forward_seconds_count[5m])) == 0", "(rate(petclf_forward_seconds_count[5m])) >= 0"),
        ("> 2 * petclf:ood_expected_unknown:ratio", "> 5 * petclf:ood_expected_unknown:ratio"),
        ("petclf:predicted_class:tvd1h > 0.3", "petclf:predicted_class:tvd1h > 0.01"),
    ],
)
def test_the_unit_tests_catch_a_wrong_rule(promtool, tmp_path, old, new):
    text = RULES.read_text()
    assert text.count(old) == 1, old
    (tmp_path / "rules.yml").write_text(text.replace(old, new))
    unit_tests = yaml.safe_load(UNIT_TESTS.read_text())
    unit_tests["rule_files"] = ["rules.yml"]
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(unit_tests, sort_keys=False))
    result = run_promtool(promtool, "test", "rules", tmp_path / "rules_test.yml")
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr, result.stdout


# What the rules read and say


def test_rules_read_only_metrics_the_app_exports(client):
    families = {f.name for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))}
    used = {name for rule in rules() for name in re.findall(r"(?<![\w:])petclf_\w+(?![\w:])", rule["expr"])}
    assert len(used) >= 10
    for name in used:
        family = re.sub(r"_(bucket|count|sum|total)$", "", name)
        assert family in families, f"{name}: the app exports no {family}"
    reasons = {reason for rule in rules() for reason in re.findall(r'reason="(\w+)"', rule["expr"])}
    assert reasons == {"queue_full", "not_ready"} and all(STATUS[r] == 503 for r in reasons)
    routes = {rule.rule for rule in client.application.url_map.iter_rules()}
    for pattern in {p for rule in rules() for p in re.findall(r'route=~"([^"]+)"', rule["expr"])}:
        assert {route for route in routes if re.fullmatch(pattern, route)} >= {"/predict"}, pattern
        assert not {route for route in routes if re.fullmatch(pattern, route)} & {"/metrics", "/readyz", "/model"}


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_a_summary_description_and_a_runbook_section():
    anchors = {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", RUNBOOK.read_text(), re.MULTILINE)}
    for alert in alerts():
        name, annotations = alert["alert"], alert["annotations"]
        assert annotations["summary"] and len(annotations["description"]) > 60, name
        assert annotations["runbook_url"] == f"docs/alerts.md#{name.lower()}"
        assert name.lower() in anchors, f"docs/alerts.md has no section {name}"
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert alert.get("for"), f"{name} would fire on a single evaluation"


# Wired in: compose, Kubernetes, a real Prometheus


def test_compose_prometheus_loads_the_rules_file():
    prometheus = yaml.safe_load(COMPOSE.read_text())["services"]["prometheus"]
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in prometheus["volumes"] if volume.endswith(":ro"))
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load(CONFIG.read_text())
    (rule_file,) = config["rule_files"]
    assert mounts["./deploy/prometheus/rules.yml"] == f"/etc/prometheus/{rule_file}"  # relative to the config
    assert [job["job_name"] for job in config["scrape_configs"]] == [JOB]


def test_kubernetes_prometheus_rule_carries_the_same_rules():
    manifest = yaml.safe_load((MONITORING / "prometheus-rule.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert manifest["spec"]["groups"] == groups()
    check = subprocess.run(
        [sys.executable, REPO_ROOT / "scripts" / "prometheus_rule.py", "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {path.name for path in MONITORING.glob("*.yaml")} - {"kustomization.yaml"}


def test_pod_monitor_scrapes_the_deployment_as_the_job_the_rules_expect():
    monitor = yaml.safe_load((MONITORING / "pod-monitor.yaml").read_text())["spec"]
    template = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    assert labels[monitor["jobLabel"]] == JOB
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {port["name"] for port in template["spec"]["containers"][0]["ports"]}
    assert any(f'job="{JOB}"' in rule["expr"] for rule in alerts())


def _loaded_rules(url: str) -> list[dict]:
    try:
        answer = requests.get(f"{url}/api/v1/rules", timeout=5)
    except requests.ConnectionError:
        return []
    return [rule for group in answer.json()["data"]["groups"] for rule in group["rules"]]


def _evaluated_rules(url: str) -> list[dict] | None:
    """Every loaded rule once each has been evaluated (health no longer "unknown"), else None."""
    loaded = _loaded_rules(url)
    return loaded if loaded and all(rule["health"] != "unknown" for rule in loaded) else None


@contextmanager
def prometheus(folder: Path, config: str, rules_text: str):
    """A real Prometheus on a free loopback port with `config` and, beside it, `rules_text` (the compose layout)."""
    (folder / CONFIG.name).write_text(config)
    (folder / RULES.name).write_text(rules_text)
    url = f"http://127.0.0.1:{free_port()}"
    command = [PROMETHEUS, f"--config.file={folder / CONFIG.name}", f"--storage.tsdb.path={folder / 'data'}",
               f"--web.listen-address={url.removeprefix('http://')}"]  # fmt: skip
    with (folder / "prometheus.log").open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield url, server
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_for(check, server: subprocess.Popen, timeout: float):
    """Poll `check()` every second until it returns something true (returned), or fail after `timeout`."""
    deadline, result = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        assert server.poll() is None, "prometheus exited"
        if result := check():
            return result
        time.sleep(1)
    pytest.fail(f"still not true after {timeout}s; last result {result!r}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_prometheus_loads_every_rule_and_evaluates_it_healthy(promtool, tmp_path):
    # The files as they are; the drift group evaluates once a minute.
    with prometheus(tmp_path, CONFIG.read_text(), RULES.read_text()) as (url, server):
        loaded = wait_for(lambda: _evaluated_rules(url), server, 150)
    assert sorted(rule["name"] for rule in loaded) == sorted(r.get("alert") or r["record"] for r in rules())
    unhealthy = [(rule["name"], rule["health"], rule.get("lastError")) for rule in loaded if rule["health"] != "ok"]
    assert not unhealthy, unhealthy


def query(url: str, expr: str) -> dict[str, float]:
    """An instant query's result: each series' labels (as text) -> value; empty while Prometheus is starting."""
    try:
        answer = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
    except requests.ConnectionError:
        return {}
    return {str(item["metric"]): float(item["value"][1]) for item in answer["data"]["result"]}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_rules_read_a_real_servers_metrics(promtool, tmp_path, trained_bundle_path, training_data):
    # The canonical gunicorn server with 2 workers on the trained bundle, scraped every second by a Prometheus with
    # the same rules (all groups evaluated every second); real predictions, then what the rules record from them.
    server = start_server(trained_bundle_path, tmp_path, workers=2, MAX_QUEUE=64)
    try:
        poll_readyz(server, workers=2)  # both workers, not just the first
        config = yaml.safe_load(CONFIG.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        (job,) = config["scrape_configs"]
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": [server.url.removeprefix("http://")]}]
        fast_rules = RULES.read_text().replace("interval: 1m", "interval: 1s")
        with prometheus(tmp_path, yaml.safe_dump(config), fast_rules) as (url, prom):
            wait_for(lambda: query(url, f'up{{job="{JOB}"}}') and query(url, "petclf_model_info"), prom, 60)
            images = sorted((training_data / "val").rglob("*.jpg"))[::3]
            # Two bursts a few scrapes apart: a labelled series is born at its first request, so a rate needs the
            # count to grow between two scrapes after that.
            for burst in (images[::2], images[1::2]):
                for path in burst:
                    files = {"image": (path.name, path.read_bytes())}
                    answer = requests.post(f"{server.url}/predict", files=files, timeout=60)
                    assert answer.status_code == 200, answer.text
                time.sleep(3)
            requests.post(f"{server.url}/predict", data=b"junk", headers={"Content-Type": "image/jpeg"}, timeout=60)
            wait_for(lambda: [v for v in query(url, "petclf:predictions:increase1h").values() if v > 0], prom, 60)
            assert list(query(url, "petclf:ready_workers:sum").values()) == [2]
            assert list(query(url, "instance:petclf_queue_fill:ratio").values()) == [0]
            assert list(query(url, "petclf_queue_capacity").values()) == [128]  # MAX_QUEUE per live worker
            assert list(query(url, "petclf:ood_expected_unknown:ratio").values()) == [pytest.approx(0.05)]
            assert sorted(query(url, "class:petclf_class_baseline:ratio").values()) == [pytest.approx(1 / 3)] * 3
            assert sum(query(url, "class:petclf_predictions:ratio_rate1h").values()) == pytest.approx(1)
            (tvd,) = query(url, "petclf:predicted_class:tvd1h").values()
            assert 0 <= tvd <= 1
            (p99,) = wait_for(lambda: query(url, 'route:petclf_request_duration_seconds:p99_5m{route="/predict"}'),
                              prom, 30).values()  # fmt: skip
            assert 0 < p99 <= 30
            assert not query(url, "petclf:request_errors:ratio_rate5m > 0")  # the junk image is a 400, no 5xx
            firing = requests.get(f"{url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
            assert not firing, firing
    finally:
        server.stop()
