"""Every series the Grafana dashboard and the alert rules query is one the services' code exports.

Fast twin of the e2e check (tests/e2e/test_stack_e2e.py), which compares against real /metrics scrapes
of the running stack: here the exposition comes from the metric classes themselves.
"""

from __future__ import annotations

import json

import pytest
from deploy_refs import (
    DASHBOARDS,
    exported_series_names,
    external_references,
    metric_names_in_expr,
    recorded_names,
    referenced_metric_names,
)
from prometheus_client import generate_latest

from reward_service.metrics import RewardMetrics
from rollout_service.metrics import RolloutMetrics
from trainer.metrics import TrainerMetrics


def code_exported_names() -> set[str]:
    registries = (TrainerMetrics().registry, RolloutMetrics().registry, RewardMetrics("any").registry)
    return set().union(*(exported_series_names(generate_latest(r).decode()) for r in registries))


def test_every_referenced_series_is_exported_by_the_code() -> None:
    missing = external_references() - code_exported_names()
    assert not missing, f"dashboard/rules query series no service exports: {sorted(missing)}"


def test_the_check_sees_the_dashboard_and_rules() -> None:
    referenced = referenced_metric_names()
    assert {"gd2po_trainer_conflict_ratio", "gd2po_trainer_steps_total"} <= referenced
    assert any(name.startswith("gd2po_reward_") for name in referenced)
    assert any(name.startswith("gd2po_rollout_") for name in referenced)
    assert recorded_names() & referenced  # recording rules are used, and excluded from the check


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("rate(gd2po_trainer_steps_total[5m])", {"gd2po_trainer_steps_total"}),
        (
            'histogram_quantile(0.95, sum by (le, reward) (rate(x_bucket{code=~"5.."}[$__rate_interval])))',
            {"x_bucket"},
        ),
        ("a / on (job) group_left (pair) b > 1e-9 and c offset 5m", {"a", "b", "c"}),
        ("scalar(max(gd2po:lag)) - sum without (instance) (y)", {"gd2po:lag", "y"}),
        ('label_replace(v, "dst", "$1", "src", "(.*)")', {"v"}),
    ],
)
def test_metric_names_in_expr(expr: str, names: set[str]) -> None:
    assert metric_names_in_expr(expr) == names


def test_suffix_handling_matches_prometheus_client_exposition() -> None:
    exposition = (
        "# HELP c_total Things\n# TYPE c counter\nc_total 1.0\n"
        "# HELP h Latency\n# TYPE h histogram\n"  # a labelled histogram with no child yet
        "# HELP g Level\n# TYPE g gauge\ng 2.0\n"
    )
    names = exported_series_names(exposition)
    assert {"c_total", "h_bucket", "h_count", "h_sum", "g"} <= names
    assert "c" not in names  # a counter is queried as c_total, never c


def test_dashboard_is_the_gd2po_training_dashboard() -> None:
    (path,) = DASHBOARDS
    dashboard = json.loads(path.read_text())
    assert dashboard["title"] == "GD²PO training"
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "conflict / drop / keep",
        "keep-ratio distribution",
        "per reward pair",
        "reward mean",
        "reward std",
        "loss",
        "grad norm",
        "kl",
        "tokens/s",
        "step time split",
        "staleness",
        "queue state",
        "reward request latency",
        "reward errors",
        "retries",
        "per data source × reward pair",  # the conflict map (issue 18)
        "snr threshold τ",
        "groups read per group trained",  # informative batches
        "generation time spent on skipped groups",
    ):
        assert topic in titles, topic
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    datasources = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert datasources == {"gd2po-prometheus"}  # the uid provisioned in deploy/grafana/provisioning
