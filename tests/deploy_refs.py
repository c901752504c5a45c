"""Which metric series the Grafana dashboard and the Prometheus rules query, and which ones a service
exports — so a test can prove every query hits a real series.

Names are compared as *series* names, the way PromQL sees them: prometheus-client exports a counter
``x`` as ``x_total`` (and ``x_created``), a histogram as ``x_bucket``/``x_count``/``x_sum``. A query on
``gd2po_trainer_steps`` (no ``_total``) would silently match nothing, so it must fail the check.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
# Series every Prometheus has without any exporter's help.
STANDARD_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

# Words PromQL reserves (by/without/on/ignoring always come with a label list and are cut out first).
_OPERATORS = {"and", "or", "unless", "atan2", "bool", "offset", "group_left", "group_right"}
_KEYWORDS = frozenset({*_OPERATORS, "inf", "nan"})
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "info": ("_info",),
}


def metric_names_in_expr(expr: str) -> set[str]:
    """Series names a PromQL expression selects (functions, keywords, labels and durations removed)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", text)  # Grafana variables such as $__rate_interval
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*+(?!\s*\()", text):
        name = match.group(0)
        if name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def dashboard_exprs(path: Path) -> list[str]:
    """Every query of a dashboard: panel targets (rows included) and templating queries."""
    dashboard = json.loads(path.read_text())
    exprs = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if variable.get("type") == "query" and query:
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query.strip()))
    return exprs


def rules(path: Path) -> list[dict]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    """Series the rule files create themselves (recording rules)."""
    return {rule["record"] for path in RULE_FILES for rule in rules(path) if "record" in rule}


def referenced_metric_names() -> set[str]:
    """Every series name the dashboards and rule files query, recording-rule outputs included."""
    exprs = [expr for path in DASHBOARDS for expr in dashboard_exprs(path)]
    exprs += [str(rule["expr"]) for path in RULE_FILES for rule in rules(path)]
    return set().union(*(metric_names_in_expr(expr) for expr in exprs))


def external_references() -> set[str]:
    """Referenced names that some gd2po service must export (not recorded by us, not Prometheus's own)."""
    return referenced_metric_names() - recorded_names() - STANDARD_SERIES


def exported_series_names(exposition: str) -> set[str]:
    """Series names a /metrics text can serve, including those of labelled families with no child yet
    (prometheus-client prints only # HELP/# TYPE for them until a label set is first used)."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def scrape_targets(prometheus_yml: Path) -> dict[str, set[str]]:
    """job → the ``host:port`` targets a Prometheus config names: its static targets, and for DNS service
    discovery each name with the job's port (each resolves to one target per replica behind it)."""
    config = yaml.safe_load(Path(prometheus_yml).read_text())
    targets: dict[str, set[str]] = {}
    for job in config["scrape_configs"]:
        named = targets.setdefault(job["job_name"], set())
        for static in job.get("static_configs", []):
            named.update(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            named.update(f"{name}:{dns['port']}" for name in dns["names"])
    return targets
