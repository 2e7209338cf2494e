"""grafana/: the fleet dashboard and the Prometheus rules query only metrics the daemon exports, every
one of them labelled with the instrument (the registry a daemon builds, on a real database)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import yaml

from dbfixture import make_database
from semwatch.config import Settings
from semwatch.service.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "grafana"
# What PromQL names that is not a metric: functions, aggregations, keywords, our label names.
NOT_METRICS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "increase", "time", "or", "and",
    "unless", "histogram_quantile", "label_values", "le", "instrument", "status", "stage", "verdict",
    "model_id", "device", "site", "job", "semwatch", "h", "m", "s",
}


def exported_names(settings: Settings) -> set[str]:
    """The sample names the daemon's registry serves, checking that each names the instrument."""
    make_database(settings.store.database, now=datetime.now(UTC), images=[{}], samples=[{}])
    metrics = Metrics(settings, model_id="m1", device="cpu", depths=lambda: {"queued": 0, "writer": 0})
    metrics.result("ok", 1.0)
    metrics.batch(1, 6)
    samples = [s for family in metrics.registry.collect() for s in family.samples]
    assert samples and all(s.labels.get("instrument") == settings.instrument.resolved_name() for s in samples)
    return {s.name for s in samples}


def expressions(node: object) -> list[str]:
    """Every PromQL expression in a dashboard (targets' `expr`, variables' `query`)."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                found.append(value["query"])
            else:
                found += expressions(value)
    elif isinstance(node, list):
        for item in node:
            found += expressions(item)
    return found


def metric_names(expr: str) -> set[str]:
    text = re.sub(r'"[^"]*"', '""', expr)  # label values are not names
    text = re.sub(r"\[[^\]]*\]", "", text)  # nor ranges
    text = re.sub(r"\$\w+", "", text)  # nor dashboard variables
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return {n for n in names if n not in NOT_METRICS}


def test_dashboard_queries_name_exported_metrics(settings: Settings) -> None:
    exported = exported_names(settings) | {"up"}  # `up` is Prometheus's own, per target
    dashboard = json.loads((GRAFANA / "dashboards" / "semwatch-fleet.json").read_text(encoding="utf-8"))
    exprs = expressions(dashboard)
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, f"{expr}: {sorted(names - exported)} not exported"
        used |= names
    # The fleet overview the issue asks for: images, fails, unknown share, queues, heartbeat age.
    assert {"semwatch_results_total", "semwatch_queue_depth", "semwatch_last_heartbeat_timestamp_seconds",
            "semwatch_samples", "semwatch_images", "semwatch_outdated_results"} <= used
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Images per hour", "Failed images per hour", "Unknown share (last hour)", "Queue depths",
            "Heartbeat age per instrument"} <= titles
    assert all("instrument" in e for e in exprs if "semwatch_" in e)  # every panel per instrument


def test_alert_rules_name_the_instrument_and_exported_metrics(settings: Settings) -> None:
    exported = exported_names(settings) | {"up"}
    rules = yaml.safe_load((GRAFANA / "prometheus" / "semwatch-rules.yml").read_text(encoding="utf-8"))
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert "daemon_stale" in alerts
    for rule in alerts.values():
        assert metric_names(rule["expr"]) <= exported, rule["expr"]
        assert "by (instrument)" in rule["expr"] and "$labels.instrument" in rule["annotations"]["summary"]
    scrape = yaml.safe_load((GRAFANA / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    job = scrape["scrape_configs"][0]
    assert job["job_name"] == "semwatch" and job["honor_labels"] is True
    assert all("instrument" in target["labels"] for target in job["static_configs"])
