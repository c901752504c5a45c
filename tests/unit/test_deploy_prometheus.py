"""Prometheus artefacts pass promtool: the compose scrape config, the rules, and a unit test per alert."""

from __future__ import annotations

import yaml
from deploy_refs import RULE_FILES, rules
from deploy_tools import DEPLOY, promtool, run

PROMETHEUS = DEPLOY / "prometheus"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
# The alerts the deployment promises (docs/operations.md §4, issue 8).
REQUIRED_ALERTS = {
    "GD2POConflictRatioSpike",
    "GD2POAllFilteredBatches",
    "GD2PORewardServiceErrorRate",
    "GD2PORewardEndpointFailing",
    "GD2POQueueBacklogGrowing",
    "GD2POTrainerStalled",
    "GD2PORolloutPolicyLag",
}


def alert_names() -> set[str]:
    return {rule["alert"] for path in RULE_FILES for rule in rules(path) if "alert" in rule}


def test_promtool_check_rules() -> None:
    result = run([promtool(), "check", "rules", *map(str, RULE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = run([promtool(), "test", "rules", *map(str, RULE_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing() -> None:
    assert alert_names() >= REQUIRED_ALERTS
    fired = {
        case["alertname"]
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alert_names() <= fired, f"alerts without a firing unit test: {sorted(alert_names() - fired)}"


def test_promtool_check_config_of_the_compose_prometheus(tmp_path) -> None:
    # rule_files points at the container path; check the config with the repository's rules instead.
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["rule_files"] = [str(path) for path in RULE_FILES]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = run([promtool(), "check", "config", str(tmp_path / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"gd2po-trainer", "gd2po-rollout", "gd2po-reward"} <= jobs
