"""deploy/, Dockerfile and docker-compose.yml: valid, consistent with each other, the code and
docs/. No Docker engine is needed: the compose file is checked, not run."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from saga_worker.metrics.hooks import METRIC_NAMES, SagaMetrics
from tests.requirements import require_binary

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "saga_worker.json"
CONTRACT = REPO / "docs" / "contract.md"

HISTOGRAMS = {
    "saga_duration_seconds",
    "saga_step_duration_seconds",
    "saga_compensation_duration_seconds",
    "saga_checkpoint_save_duration_seconds",
    "saga_audit_log_write_duration_seconds",
}
ALERTS = {
    "SagaWorkerDown",
    "SagaBeatDown",
    "SagasStalled",
    "SagasParked",
    "SagasWaitingPastTimeout",
    "SagaAttemptsStalling",
    "SagaFailureRateHigh",
    "SagaCompensationFailed",
    "SagasAwaitingOperator",
    "SagaCheckpointWriteSlow",
}


def run_promtool(*args: str) -> None:
    result = subprocess.run(
        [require_binary("promtool"), *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config() -> None:
    run_promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))


def test_promtool_check_rules() -> None:
    run_promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))


def test_promtool_test_rules_proves_every_alert_fires() -> None:
    run_promtool("test", "rules", str(PROMETHEUS / "alerts_test.yml"))
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    defined = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert defined == ALERTS
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == ALERTS, "every alert needs a promtool test where it fires"


# -- metric names -----------------------------------------------------------------------------

_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "le",
    "inf",
    "nan",
}


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\$\w+", "", text)  # Grafana variables
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\b\d+(\.\d+)?[smhdwy]?\b", "", text)  # numbers, durations
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("(") or word.lower() in _PROMQL_WORDS:
            continue  # a function call or a keyword
        names.add(word)
    return names


def exported_series() -> set[str]:
    """Every series name the endpoints serve, plus Prometheus' own `up`."""
    series = {"up"}
    for name in METRIC_NAMES:
        series.add(name)
        if name in HISTOGRAMS:
            series.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    return series


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, saga_type) (rate(saga_step_duration_seconds_bucket"
        '{saga_type=~"$saga_type"}[$__rate_interval]))) > 0.5 or absent(up{job="x"} == 1)'
    )
    assert metric_names_in(expr) == {"saga_step_duration_seconds_bucket", "up"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_dashboard_queries_name_only_exported_metrics() -> None:
    board = dashboard()
    used: set[str] = set()
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            names = metric_names_in(target["expr"])
            unknown = names - exported_series()
            assert not unknown, f"panel {panel['title']!r} queries {unknown}"
            used |= names
    for variable in board["templating"]["list"]:
        used |= metric_names_in(variable.get("definition", "")) - {"label_values"}
    base = {
        re.sub(r"_(bucket|sum|count)$", "", n) if n.startswith(tuple(HISTOGRAMS)) else n
        for n in used
    }
    missing = METRIC_NAMES - base
    assert not missing, f"exported but on no panel: {missing}"


def test_dashboard_covers_what_operators_watch() -> None:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    everything = "\n".join(exprs)
    for histogram in ("saga_duration_seconds", "saga_step_duration_seconds"):
        for quantile in ("0.5", "0.99"):
            assert any(
                f"histogram_quantile({quantile}," in e and histogram + "_bucket" in e for e in exprs
            ), (histogram, quantile)
    assert any("saga_step_duration_seconds_bucket" in e and "step_name" in e for e in exprs)
    for needed in (
        "saga_started_total",  # throughput
        "saga_running_current",  # in flight
        "saga_failed_total",
        "saga_compensation_failed_total",
        "saga_checkpoint_save_duration_seconds_bucket",
        "saga_audit_log_write_duration_seconds_bucket",
        "saga_recovered_total",
    ):
        assert needed in everything, needed
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_datasource_is_a_variable_so_it_imports_anywhere() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    variable_ds = {"type": "prometheus", "uid": "${datasource}"}
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == variable_ds, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"] == variable_ds, panel["title"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == variable_ds, variable["name"]
    assert datasource_uids(board) == {"${datasource}"}


def datasource_uids(node: Any) -> set[str]:
    """Every datasource uid anywhere in the dashboard JSON."""
    found: set[str] = set()
    if isinstance(node, dict):
        source = node.get("datasource")
        if isinstance(source, dict) and "uid" in source:
            found.add(source["uid"])
        for value in node.values():
            found |= datasource_uids(value)
    elif isinstance(node, list):
        for value in node:
            found |= datasource_uids(value)
    return found


def test_dashboard_job_names_are_variables_defaulting_to_prometheus_yml() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in scrape["scrape_configs"]}
    assert variables["job"]["query"] == "saga_worker" in jobs
    assert variables["beat_job"]["query"] == "saga_beat" in jobs
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            assert 'job="' not in expr, f"{panel['title']!r} hard-codes a job: {expr}"
            for name in metric_names_in(expr):
                for matchers in re.findall(rf"\b{name}(\{{[^}}]*\}})?", expr):
                    assert 'job=~"$job' in matchers or 'job=~"$beat_job"' in matchers, (
                        panel["title"],
                        expr,
                    )


def test_alert_rules_name_only_exported_metrics() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            unknown = metric_names_in(rule["expr"]) - exported_series()
            assert not unknown, f"{rule['alert']} uses {unknown}"


def test_grafana_provisioning_matches_dashboard() -> None:
    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    # The dashboard names no datasource uid: the variable picks the default one (this one).
    assert source["isDefault"] is True
    providers = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "saga_worker.yml").read_text()
    )
    (provider,) = providers["providers"]
    grafana = compose()["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]


def contract_metrics() -> dict[str, tuple[str, ...]]:
    """`name{labels}` of the Metrics section of docs/contract.md (the binding contract)."""
    text = CONTRACT.read_text()
    start = text.index("\n## Metrics\n")
    section = text[start : text.index("\n## ", start + 1)]
    return {
        name: tuple(labels.split(","))
        for name, labels in re.findall(r"`(saga_[a-z_]+)\{([a-z_,]+)\}`", section)
    }


def test_metrics_match_contract_names_and_labels() -> None:
    contract = contract_metrics()
    assert set(contract) == METRIC_NAMES
    m = SagaMetrics()  # not registered anywhere: registry=None
    served: dict[str, tuple[str, ...]] = {}
    for value in vars(m).values():
        name = value._name + ("_total" if value._type == "counter" else "")
        labels = tuple(value._labelnames)
        if value._type == "histogram":
            labels = tuple(n for n in labels if n != "le")
        served[name] = labels
    # The state gauges come from the database collector, not from SagaMetrics.
    gauges = ("running", "failed", "stalled", "parked", "waiting", "waiting_overdue")
    for gauge in (f"saga_{name}_current" for name in gauges):
        served[gauge] = ("saga_type",)
    assert served == contract


# -- docker compose ----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return loaded


def published_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for spec in service.get("ports", []):
        host_ip, host_port, _container = str(spec).split(":")
        assert host_ip == "127.0.0.1", f"{spec} must listen on loopback only"
        ports.add(int(host_port))
    return ports


def readme_ports() -> dict[str, int]:
    """The published ports the operations runbook lists for the compose stack."""
    runbook = (REPO / "docs" / "operations.md").read_text()
    section = runbook[runbook.index("## Docker compose") :]
    return {
        service: int(port)
        for service, port in re.findall(r"^\| (\w+) \| (\d+) \|", section, re.MULTILINE)
    }


def deployment_doc_ports() -> dict[str, int]:
    doc = (REPO / "docs" / "deployment.md").read_text()
    return {
        service: int(port)
        for service, port in re.findall(r"^\| (\w+) \| (\d+) \|", doc, re.MULTILINE)
    }


def test_compose_services_ports_and_health_checks() -> None:
    services = compose()["services"]
    assert set(services) == {
        "postgres",
        "redis",
        "migrate",
        "worker",
        "beat",
        "flower",
        "console",
        "prometheus",
        "alertmanager",
        "grafana",
    }
    ports = {name: published_ports(s) for name, s in services.items() if s.get("ports")}
    published = {name: p for name, (p,) in ((n, tuple(v)) for n, v in ports.items())}
    assert published == deployment_doc_ports()
    # The operations runbook's table may list fewer services, but no port that is not published.
    assert readme_ports().items() <= published.items()
    for name, service in services.items():
        if name == "migrate":
            assert service["restart"] == "no" and "healthcheck" not in service
            continue
        check = service.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"


def test_compose_start_order() -> None:
    services = compose()["services"]
    healthy, done, started = "service_healthy", "service_completed_successfully", "service_started"

    def conditions(name: str) -> dict[str, str]:
        return {dep: c["condition"] for dep, c in services[name]["depends_on"].items()}

    assert conditions("migrate") == {"postgres": healthy}
    for name in ("worker", "beat"):
        assert conditions(name) == {"postgres": healthy, "redis": healthy, "migrate": done}
    assert conditions("flower") == {"redis": healthy, "migrate": done}
    assert conditions("prometheus") == {
        "worker": started,
        "beat": started,
        "flower": started,
        "alertmanager": started,
    }
    assert conditions("grafana") == {"prometheus": healthy}


def test_compose_wiring_matches_prometheus_and_flower_auth() -> None:
    services = compose()["services"]
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    (worker_sd,) = jobs["saga_worker"]["dns_sd_configs"]
    assert worker_sd["names"] == ["worker"]
    assert services["worker"]["environment"]["SAGA_METRICS_PORT"] == str(worker_sd["port"])
    beat_target = jobs["saga_beat"]["static_configs"][0]["targets"]
    assert beat_target == [f"beat:{services['beat']['environment']['SAGA_METRICS_PORT']}"]
    assert jobs["flower"]["static_configs"][0]["targets"] == ["flower:5555"]
    assert "--port=5555" in services["flower"]["command"]
    # Basic auth from the environment, required (compose refuses to start without it).
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith(
        "${FLOWER_BASIC_AUTH:?"
    )
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    for name in ("migrate", "worker", "beat", "flower", "console"):
        env = services[name]["environment"]
        assert env["SAGA_DATABASE_URL"].endswith("@postgres:5432/saga")
        assert env["SAGA_BROKER_URL"] == "redis://redis:6379/0"
        assert services[name]["image"] == "saga-worker:latest" and services[name]["build"] == "."


RUNTIME_ROLE = "saga_app"


def test_compose_migrates_as_owner_and_runs_everything_else_as_the_runtime_role() -> None:
    services = compose()["services"]
    owner = services["postgres"]["environment"]["POSTGRES_USER"]
    assert owner != RUNTIME_ROLE
    migrate = services["migrate"]
    assert migrate["environment"]["SAGA_DATABASE_URL"].startswith(
        f"postgresql+psycopg://{owner}:${{POSTGRES_PASSWORD"
    )
    script = " ".join(migrate["command"])
    upgrade = script.index("saga-worker db upgrade")
    grant = script.index(f"saga-worker db grant {RUNTIME_ROLE} --create")
    assert upgrade < grant and "&&" in script[upgrade:grant]
    assert "--password-env SAGA_APP_DB_PASSWORD" in script and "--examples" in script
    assert migrate["environment"]["SAGA_APP_DB_PASSWORD"].startswith("${SAGA_APP_DB_PASSWORD")
    long_running = [n for n, s in services.items() if s.get("image") == "saga-worker:latest"]
    assert set(long_running) == {"migrate", "worker", "beat", "flower", "console"}
    for name in long_running:
        if name == "migrate":
            continue
        url = services[name]["environment"]["SAGA_DATABASE_URL"]
        assert url.startswith(f"postgresql+psycopg://{RUNTIME_ROLE}:${{SAGA_APP_DB_PASSWORD"), name


def test_compose_worker_grace_period_outlasts_the_longest_step() -> None:
    from saga_worker.config import Settings
    from saga_worker.core.definition import DEFAULT_TIMEOUT_SECONDS
    from saga_worker.worker.dispatch import HARD_LIMIT_MARGIN_SECONDS
    from saga_worker.worker.shutdown import longest_local_step_seconds

    grace = compose()["services"]["worker"]["stop_grace_period"]
    match = re.fullmatch(r"(\d+)s", grace)
    assert match, grace
    import saga_worker.examples  # noqa: F401  (registers the sagas the compose stack runs)
    from saga_worker import registry

    default = Settings.from_env({}).default_step_timeout_seconds
    assert default == DEFAULT_TIMEOUT_SECONDS
    # A step of any saga the stack may import (SAGA_IMPORTS) may use the default timeout.
    longest = max(
        longest_local_step_seconds(registry.all_definitions(), default),
        default + HARD_LIMIT_MARGIN_SECONDS,
    )
    assert int(match.group(1)) >= longest + 15, "leave time for the last checkpoint and acks"


def test_prometheus_sends_alerts_to_the_composed_alertmanager() -> None:
    services = compose()["services"]
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (manager,) = scrape["alerting"]["alertmanagers"]
    assert manager["static_configs"][0]["targets"] == ["alertmanager:9093"]
    alertmanager = services["alertmanager"]
    assert "./deploy/alertmanager:/etc/alertmanager:ro" in alertmanager["volumes"]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in alertmanager["command"]
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    receivers = {r["name"] for r in config["receivers"]}
    assert config["route"]["receiver"] in receivers
    assert all(route["receiver"] in receivers for route in config["route"].get("routes", []))
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    severities = {r["labels"]["severity"] for g in rules["groups"] for r in g["rules"]}
    routed = {m.split("=")[1].strip('"') for r in config["route"]["routes"] for m in r["matchers"]}
    assert routed <= severities
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    for inhibit in config.get("inhibit_rules", []):
        for matcher in inhibit["source_matchers"] + inhibit["target_matchers"]:
            parsed = re.fullmatch(r'(\w+)=~?"(.*)"', matcher)
            assert parsed, matcher
            label, value = parsed.groups()
            if label == "alertname":
                assert set(value.split("|")) <= alerts, matcher


def test_amtool_check_config() -> None:
    result = subprocess.run(
        [
            require_binary("amtool"),
            "check-config",
            str(DEPLOY / "alertmanager" / "alertmanager.yml"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_the_package_with_its_migrations() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    for line in (
        "COPY saga_worker ./saga_worker",
        "COPY saga_remote.py ./",  # pyproject's py-modules
        "COPY migrations ./migrations",
        "RUN pip install '.[flower,web]'",  # Flower and the console run from the same image
    ):
        assert line in dockerfile
    assert "USER saga" in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


SIGNING_SECRET = "saga_signing_key"


def test_compose_gives_every_saga_process_the_signing_key_from_a_file_secret() -> None:
    """Without SAGA_SIGNING_KEY(_FILE) the first process generates the key and stores it in
    saga_settings, where the run-time role can read it: compose mounts it as a secret."""
    loaded = compose()
    services = loaded["services"]
    secret = loaded["secrets"][SIGNING_SECRET]
    assert secret == {"file": f"./secrets/{SIGNING_SECRET}"}
    saga_services = [n for n, s in services.items() if s.get("image") == "saga-worker:latest"]
    assert set(saga_services) == {"migrate", "worker", "beat", "flower", "console"}
    for name in saga_services:
        env = services[name]["environment"]
        assert env["SAGA_SIGNING_KEY_FILE"] == f"/run/secrets/{SIGNING_SECRET}", name
        assert "SAGA_SIGNING_KEY" not in env, name  # the key itself never in the environment
        assert SIGNING_SECRET in services[name]["secrets"], name
    for name, service in services.items():
        if name not in saga_services:
            assert SIGNING_SECRET not in service.get("secrets", []), name
    # The secret file stays out of git and out of the image's build context.
    assert "secrets/" in (REPO / ".gitignore").read_text().split()
    assert "secrets" in (REPO / ".dockerignore").read_text().split()
    # docs/deployment.md says how to create it.
    deployment = (REPO / "docs" / "deployment.md").read_text()
    assert "python3 -c 'import secrets;print(secrets.token_hex(32))'" in deployment
    assert f"secrets/{SIGNING_SECRET}" in deployment
