"""`make test-deploy`: the CPU profile of docker-compose.yml, as users deploy it, on a real Docker engine.

One scenario, in file order: the images built from this checkout (deploy/docker/Dockerfile.cpu), one
reward service run alone under the Helm chart's pod security settings, then the whole stack — Redis,
four reward services (two replicas of correctness), the vLLM rollout, the DeepSpeed trainer and
Prometheus with the shipped rules — until trainer steps advance and each new policy reaches the rollout.
Stopping the second correctness replica must raise the shipped GD2POServiceDown alert (pending, then
firing after its `for: 2m`) while training goes on with the first replica. A second rollout replica
scaled in mid-run (`--scale rollout-cpu=2`) must start on the newest policy, generate, reload, be trained
from and be scraped. Then the trainer is recreated with `WEIGHTS_TRANSPORT=broadcast`: both replicas must
receive its versions over gloo between the containers. `docker compose down -v` must leave nothing, and
the engine is stopped by its PID.

Nothing is skipped: a step that cannot happen (no engine, no image, vLLM that does not start) fails
with what went wrong and the logs of the service concerned. Fixtures: tests/deploy/conftest.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import yaml
from compose_stack import (
    KEEP_CACHE,
    PROJECT,
    PUBLISHED_PORTS,
    REPO_ROOT,
    Stack,
    Timeline,
    container_ip,
    prometheus,
    wait_until,
)
from deploy_refs import scrape_targets
from docker_engine import DockerEngine, pid_alive

# Image build (cold: ~7 min), vLLM warm-up and the steps all count against the first tests that need
# them; the whole scenario takes 10–25 min on 2 cores.
pytestmark = pytest.mark.timeout(2400)

CPU_SERVICES = {
    "redis",
    "reward-correctness",
    "reward-correctness-2",
    "reward-format",
    "reward-length",
    "rollout-cpu",
    "trainer-cpu",
    "prometheus",
}
GD2PO_SERVICES = sorted(name for name in CPU_SERVICES if name.startswith(("reward", "rollout", "trainer")))
REPLICA_1, REPLICA_2 = "http://reward-correctness:8000", "http://reward-correctness-2:8000"
DEPLOY = REPO_ROOT / "deploy"
RULES_FILE = DEPLOY / "prometheus" / "rules" / "gd2po.rules.yml"
# The trainer trains groups at most trainer.max_staleness (1) policy versions old; see the alert test.
MAX_STALENESS = yaml.safe_load((REPO_ROOT / "configs" / "tool_calling_compose.yaml").read_text())["trainer"][
    "max_staleness"
]

# A real tool-calling label: an exact call scores +3, an unreadable call block −3 (tool_call.correctness).
LABEL = '<tool_call>\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n</tool_call>'


def test_a_reward_service_runs_under_the_charts_pod_security(
    stack: Stack, engine: DockerEngine, timeline: Timeline
) -> None:
    """deploy/helm/gd2po's pod and container securityContext — uid/gid 10001, read-only root filesystem,
    every capability dropped, no privilege escalation (seccomp: Docker's default profile) — with the
    chart's scratch mounts (/tmp and /home/gd2po emptyDirs, the config read-only). Runs while the stack
    (already started by the fixture) warms up."""
    name = "gd2po-deploy-test-pod-security"
    engine.docker("rm", "--force", name, check=False)
    token_file = stack.env_file.with_name("pod-security.env")
    token_file.write_text(f"GD2PO_AUTH__TOKEN={stack.secrets['GD2PO_API_TOKEN']}\n")
    config = REPO_ROOT / "configs" / "tool_calling_compose.yaml"
    engine.docker(
        "run", "--detach", "--name", name,
        "--read-only", "--user", "10001:10001", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--tmpfs", "/tmp", "--tmpfs", "/home/gd2po",
        "--volume", f"{config}:/etc/gd2po/config.yaml:ro",
        "--env-file", str(token_file),
        "gd2po:cpu", "reward", "correctness",
    )  # fmt: skip
    try:
        started = time.monotonic()
        inspected = json.loads(engine.docker("inspect", name).stdout)[0]
        url = f"http://{inspected['NetworkSettings']['IPAddress']}:8000"

        def logs() -> str:
            result = engine.docker("logs", "--tail", "40", name, check=False)
            return (result.stdout + result.stderr)[-4000:]

        def ready() -> tuple[bool, str]:
            if not json.loads(engine.docker("inspect", name).stdout)[0]["State"]["Running"]:
                pytest.fail(
                    f"the reward container exited under the pod security settings:\n{logs()}", pytrace=False
                )
            response = httpx.get(f"{url}/readyz", timeout=5)
            return response.status_code == 200, f"/readyz {response.status_code}"

        wait_until(
            "the reward service under pod security answers /readyz", ready, 180, interval=1, diagnose=logs
        )
        timeline.record("pod-security reward ready", time.monotonic() - started)
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200

        host = inspected["HostConfig"]
        assert host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"], host
        assert "no-new-privileges" in host["SecurityOpt"] and inspected["Config"]["User"] == "10001:10001"
        # What the kernel applied to the service process (PID 1: the entrypoint execs python).
        status = dict(
            line.split(":", 1)
            for line in engine.docker("exec", name, "cat", "/proc/1/status").stdout.splitlines()
            if ":" in line
        )
        assert status["Uid"].split()[:2] == ["10001", "10001"], status["Uid"]
        assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"].strip() == "1", status
        write = engine.docker("exec", name, "touch", "/opt/gd2po/probe", check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write

        body = {
            "items": [
                {
                    "id": "exact",
                    "prompt": "What is the weather in Paris?",
                    "completion": LABEL,
                    "label": LABEL,
                },
                {
                    "id": "broken",
                    "prompt": "p",
                    "completion": "<tool_call>\n{oops\n</tool_call>",
                    "label": LABEL,
                },
            ]
        }
        unauthenticated = httpx.post(f"{url}/v1/score", json=body, timeout=30)
        assert unauthenticated.status_code == 401, "the bearer token is not demanded"
        token = {"Authorization": f"Bearer {stack.secrets['GD2PO_API_TOKEN']}"}
        response = httpx.post(f"{url}/v1/score", json=body, headers=token, timeout=30)
        assert response.status_code == 200, response.text
        scores = {r["id"]: (r["status"], r["score"]) for r in response.json()["results"]}
        assert scores == {"exact": ("ok", 3.0), "broken": ("ok", -3.0)}, response.text
    finally:
        engine.docker("rm", "--force", name, check=False)


def test_every_service_becomes_healthy(stack: Stack, timeline: Timeline) -> None:
    """Every service of the CPU profile and nothing else (Grafana has its own profile): running, healthy
    where it has a healthcheck, and each gd2po service ready (/readyz: the rollout once vLLM is loaded)."""

    def healthy() -> tuple[bool, dict[str, str]]:
        containers = stack.containers()
        states = {
            service: c["State"]["Status"]
            + ("/" + c["State"]["Health"]["Status"] if c["State"].get("Health") else "")
            for service, c in containers.items()
        }
        if set(containers) != CPU_SERVICES:
            pytest.fail(f"compose runs {sorted(containers)}, expected {sorted(CPU_SERVICES)}", pytrace=False)
        if any(c["State"]["Status"] in {"exited", "dead"} for c in containers.values()):
            pytest.fail(f"a service stopped: {states}\n{stack.logs()}", pytrace=False)
        if any(state.endswith("/unhealthy") for state in states.values()):
            pytest.fail(f"a service is unhealthy: {states}\n{stack.logs()}", pytrace=False)
        restarted = [service for service, c in containers.items() if c["RestartCount"]]
        if restarted:  # a crash loop (restart: unless-stopped) would otherwise look like a slow start
            pytest.fail(f"services restarted: {restarted}\n{stack.logs(*restarted)}", pytrace=False)
        return all(state in {"running", "running/healthy"} for state in states.values()), states

    wait_until("every service running and healthy", healthy, 600, diagnose=stack.logs)
    timeline.record("all services healthy (since up)", time.monotonic() - stack.started)

    for service in GD2PO_SERVICES:

        def ready(service: str = service) -> tuple[bool, str]:
            response = httpx.get(f"{stack.url(service)}/readyz", timeout=5)
            return response.status_code == 200, f"{service} /readyz {response.status_code}"

        wait_until(f"{service} ready", ready, 900, interval=5, diagnose=lambda s=service: stack.logs(s))
    timeline.record("every gd2po service ready (since up)", time.monotonic() - stack.started)

    # What compose publishes on the host: the rollout's API and Prometheus.
    for what, path in (("rollout API", "/healthz"), ("Prometheus", "/-/ready")):
        response = httpx.get(f"http://127.0.0.1:{PUBLISHED_PORTS[what]}{path}", timeout=5)
        assert response.status_code == 200, f"{what} on its published port: {response.status_code}"
    restarts = {service: c["RestartCount"] for service, c in stack.containers().items() if c["RestartCount"]}
    assert not restarts, f"services restarted: {restarts}\n{stack.logs(*restarts)}"


def test_trainer_steps_advance_and_each_policy_reaches_the_rollout(stack: Stack, timeline: Timeline) -> None:
    """Two optimizer steps, read from the trainer's /metrics, and the rollout serving policy version 2
    (the trainer publishes a version per step; the rollout reloads it in place), with no failed reload
    and no dead-lettered group."""
    steps_seen: dict[int, float] = {}

    def steps(target: int) -> tuple[bool, str]:
        trainer = stack.metrics("trainer-cpu")
        done = int(trainer.value("gd2po_trainer_steps_total"))
        for step in range(1, done + 1):
            steps_seen.setdefault(step, time.monotonic() - stack.started)
        return (
            done >= target,
            f"{done} steps, policy version {trainer.value('gd2po_trainer_policy_version'):.0f}",
        )

    diagnose = lambda: stack.logs("trainer-cpu", "rollout-cpu")  # noqa: E731
    wait_until("the first trainer step", lambda: steps(1), 1200, diagnose=diagnose)
    timeline.record("first trainer step (since up)", steps_seen[1])
    wait_until("the second trainer step", lambda: steps(2), 600, diagnose=diagnose)
    timeline.record("second trainer step (since up)", steps_seen[2])

    def rollout_version() -> tuple[bool, float]:
        version = stack.metrics("rollout-cpu").value("gd2po_rollout_policy_version")
        return version >= 2, version

    wait_until("the rollout serving policy version 2", rollout_version, 300, diagnose=diagnose)
    timeline.record("rollout on policy version 2 (since up)", time.monotonic() - stack.started)

    trainer, rollout = stack.metrics("trainer-cpu"), stack.metrics("rollout-cpu")
    assert trainer.value("gd2po_trainer_policy_version") >= 2
    # 2 steps × 2 prompts: trained groups are counted when acknowledged, at the next checkpoint; until
    # then they are the queue's pending entries.
    trained = trainer.value("gd2po_trainer_groups_total", outcome="trained")
    assert trained + trainer.value("gd2po_trainer_queue_pending") >= 4
    assert rollout.value("gd2po_rollout_weight_reload_seconds_count") >= 2
    assert rollout.value("gd2po_rollout_weight_reload_failures_total") == 0
    assert rollout.value("gd2po_rollout_deadletter_total") == 0
    for reward in ("correctness", "format", "length"):  # every reward service was called and answered
        assert rollout.value("gd2po_rollout_reward_call_seconds_count", reward=reward) > 0, reward


def shipped_rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    return {rule.get("alert") or rule["record"]: rule for group in groups for rule in group["rules"]}


def test_prometheus_scrapes_every_target_and_evaluates_every_shipped_rule(stack: Stack) -> None:
    """The containerised Prometheus: every target of deploy/prometheus/prometheus.yml up, and exactly
    the rules of the shipped rules file loaded, each evaluated without error."""
    targets = scrape_targets(DEPLOY / "prometheus" / "prometheus.yml")
    assert targets["gd2po-rollout"] == {"rollout:8000"}  # found by DNS: one target per replica, by address
    rollouts = {f"{container_ip(c)}:8000" for c in stack.replicas()["rollout-cpu"]}
    expected = set().union(*(t for job, t in targets.items() if job != "gd2po-rollout")) | rollouts

    def targets_up() -> tuple[bool, dict[str, str]]:
        active = prometheus("/api/v1/targets", state="active")["activeTargets"]
        health = {
            t["labels"]["instance"]: t["health"] + (f" ({t['lastError']})" if t["lastError"] else "")
            for t in active
        }
        return set(health) == expected and all(h == "up" for h in health.values()), health

    wait_until("every Prometheus target up", targets_up, 60)

    rules = shipped_rules()

    def rules_ok() -> tuple[bool, dict[str, str]]:
        loaded = {
            rule["name"]: (rule["health"], rule.get("lastError", ""), group["file"], rule.get("duration", 0))
            for group in prometheus("/api/v1/rules")["groups"]
            for rule in group["rules"]
        }
        if set(loaded) != set(rules):
            return False, {"loaded": sorted(loaded), "shipped": sorted(rules)}
        return all(health == "ok" for health, *_ in loaded.values()), loaded

    # A rule is "unknown" until its group is evaluated once (every 5 s here).
    loaded = wait_until("every shipped rule evaluated and healthy", rules_ok, 60)
    assert {file for _, _, file, _ in loaded.values()} == {"/etc/prometheus/rules/gd2po.rules.yml"}
    assert loaded["GD2POServiceDown"][3] == 120  # the shipped `for: 2m`, not a test copy


def alert_state(instance: str) -> str | None:
    """pending / firing for GD2POServiceDown on ``instance``, or None."""
    for alert in prometheus("/api/v1/alerts")["alerts"]:
        if (
            alert["labels"].get("alertname") == "GD2POServiceDown"
            and alert["labels"].get("instance") == instance
        ):
            return alert["state"]
    return None


def test_a_stopped_replica_raises_service_down_while_training_goes_on(
    stack: Stack, timeline: Timeline
) -> None:
    """`docker compose stop reward-correctness-2`: Prometheus sees the target down and the shipped
    GD2POServiceDown alert goes pending at once and fires after its `for: 2m`; meanwhile the rollout
    fails over to the first replica and the trainer keeps stepping on groups scored after the stop.

    The proof that training goes on without the stopped replica: the rollout served policy version v at
    the stop, so groups of version v+1 or later were generated, and scored, after it. The trainer only
    trains groups at most max_staleness versions old, so the step that publishes version
    v + 2 + max_staleness trained on such groups only."""
    instance = "reward-correctness-2:8000"
    assert alert_state(instance) is None, "GD2POServiceDown was already active before the stop"
    rollout = stack.metrics("rollout-cpu")
    version_at_stop = rollout.value("gd2po_rollout_policy_version")
    calls_1 = rollout.value("gd2po_rollout_reward_call_seconds_count", endpoint=REPLICA_1)
    groups = rollout.value("gd2po_rollout_groups_total")
    dead = rollout.value("gd2po_rollout_deadletter_total")

    stopped = time.monotonic()
    stack.compose("stop", "reward-correctness-2")
    timeline.record("compose stop reward-correctness-2", time.monotonic() - stopped)

    seen: dict[str, float] = {}

    def watch_alert() -> str | None:
        state = alert_state(instance)
        if state is not None:
            seen.setdefault(state, time.monotonic() - stopped)
        return state

    def active() -> tuple[bool, str | None]:
        state = watch_alert()
        return state is not None, state

    wait_until(f"GD2POServiceDown active for {instance}", active, 90, interval=1)
    assert "pending" in seen, f"GD2POServiceDown skipped pending (no `for:`?): {seen}"
    timeline.record("GD2POServiceDown pending (since the stop)", seen["pending"])

    target_version = version_at_stop + 2 + MAX_STALENESS

    def trained_after_stop() -> tuple[bool, str]:
        watch_alert()
        version = stack.metrics("trainer-cpu").value("gd2po_trainer_policy_version")
        return (
            version >= target_version,
            f"trainer policy version {version:.0f}, waiting for {target_version:.0f}",
        )

    wait_until(
        "the trainer stepping on groups scored after the stop",
        trained_after_stop,
        900,
        diagnose=lambda: stack.logs("trainer-cpu", "rollout-cpu"),
    )
    timeline.record(
        f"trainer policy version {target_version:.0f} (= rollout's at the stop + {2 + MAX_STALENESS}; since the stop)",
        time.monotonic() - stopped,
    )

    def fired() -> tuple[bool, dict[str, float]]:
        watch_alert()
        return "firing" in seen, seen

    # `for: 2m` counts from the first evaluation that saw the target down (5 s evaluation interval).
    left = seen["pending"] + 120 + 30 - (time.monotonic() - stopped)
    wait_until("GD2POServiceDown firing after its 2 minutes", fired, max(left, 10), interval=2)
    timeline.record("GD2POServiceDown firing (since the stop)", seen["firing"])
    assert seen["firing"] - seen["pending"] >= 110, f"fired before its 2 minutes: {seen}"

    rollout = stack.metrics("rollout-cpu")
    assert rollout.value("gd2po_rollout_groups_total") > groups
    assert rollout.value("gd2po_rollout_reward_call_seconds_count", endpoint=REPLICA_1) > calls_1
    # The rollout did try the stopped replica (round-robin) and went on to the other one.
    assert rollout.value("gd2po_rollout_reward_failures_total", endpoint=REPLICA_2) > 0
    assert rollout.value("gd2po_rollout_deadletter_total") == dead, "a group was dead-lettered"
    down = {
        t["labels"]["instance"]
        for t in prometheus("/api/v1/targets", state="active")["activeTargets"]
        if t["health"] != "up"
    }
    assert down == {instance}, f"targets down besides the stopped replica: {down}"


def test_a_second_rollout_replica_joins_mid_run_and_follows_the_policy(
    stack: Stack, timeline: Timeline
) -> None:
    """`docker compose up --scale rollout-cpu=2` while the stack trains: the new container gets the next
    published port, starts on the newest policy (not the base model), generates groups from the shared
    prompt order, reloads each new policy in place like the first one, the trainer trains groups of both
    replicas and accounts their staleness apart, and Prometheus finds it by DNS and scrapes it.
    (One replica of correctness is still stopped from the test before: the new rollout must start anyway.)"""
    started = time.monotonic()
    stack.compose("up", "--detach", "--no-deps", "--no-recreate", "--scale", "rollout-cpu=2", "rollout-cpu")
    assert len(stack.replicas()["rollout-cpu"]) == 2
    diagnose = lambda: stack.logs("rollout-cpu")  # noqa: E731

    def ready() -> tuple[bool, str]:
        response = httpx.get(f"{stack.url('rollout-cpu', 1)}/readyz", timeout=5)
        return response.status_code == 200, f"/readyz {response.status_code}"

    wait_until("the second rollout replica ready", ready, 900, interval=5, diagnose=diagnose)
    timeline.record("second rollout replica ready (since scale-up)", time.monotonic() - started)
    joined = stack.metrics("rollout-cpu", 1).value("gd2po_rollout_policy_version")
    assert joined >= 1, f"the new replica serves policy version {joined}, not the trainer's newest"
    # Its API on a host port of the range the compose file publishes (8200-8203), next to the first's.
    ports = [
        int(c["NetworkSettings"]["Ports"]["8000/tcp"][0]["HostPort"]) for c in stack.replicas()["rollout-cpu"]
    ]
    assert ports[0] == PUBLISHED_PORTS["rollout API"] and ports[1] in range(8201, 8204), ports
    assert httpx.get(f"http://127.0.0.1:{ports[1]}/healthz", timeout=5).status_code == 200

    def generating_and_reloading() -> tuple[bool, str]:
        replica = stack.metrics("rollout-cpu", 1)
        groups, version = (
            replica.value("gd2po_rollout_groups_total"),
            replica.value("gd2po_rollout_policy_version"),
        )
        return groups >= 1 and version > joined, f"{groups:.0f} groups, policy version {version:.0f}"

    wait_until("the new replica generating and reloading", generating_and_reloading, 600, diagnose=diagnose)
    timeline.record("second replica: groups and a reload (since scale-up)", time.monotonic() - started)
    replica = stack.metrics("rollout-cpu", 1)
    assert replica.value("gd2po_rollout_weight_reload_failures_total") == 0
    assert replica.value("gd2po_rollout_deadletter_total") == 0

    def both_trained() -> tuple[bool, dict[str, float]]:
        trainer = stack.metrics("trainer-cpu")
        trained = {
            labels["producer"]: value
            for name, labels, value in trainer.samples
            if name == "gd2po_trainer_producer_groups_total" and labels.get("outcome") == "trained"
        }
        return len(trained) >= 2 and trainer.has("gd2po_trainer_producer_staleness_count"), trained

    wait_until("the trainer training groups of both replicas", both_trained, 600, diagnose=diagnose)

    def scraped() -> tuple[bool, dict[str, str]]:
        active = prometheus("/api/v1/targets", state="active")["activeTargets"]
        health = {
            t["labels"]["instance"]: t["health"] for t in active if t["labels"]["job"] == "gd2po-rollout"
        }
        return len(health) == 2 and set(health.values()) == {"up"}, health

    wait_until("Prometheus scraping both rollout replicas", scraped, 60)


def test_weights_reach_both_rollout_replicas_over_gloo_once_the_trainer_broadcasts(
    stack: Stack, timeline: Timeline
) -> None:
    """WEIGHTS_TRANSPORT=broadcast and `docker compose up trainer-cpu`: the trainer is recreated with
    ``trainer.publish.transport: broadcast`` and resumes from its checkpoint; from its container it serves
    each new version over gloo (its store at trainer:29500, then gloo's own connections between the
    containers) to both rollout replicas, which receive versions no folder holds (one every 10) with no
    failed transfer on either side. (The rollouts are not restarted: the offer in Redis tells them.)"""
    before = stack.metrics("trainer-cpu").value("gd2po_trainer_policy_version")
    stack.set_knobs(WEIGHTS_TRANSPORT="broadcast", TOTAL_STEPS="400")  # steps left for the transfers below
    started = time.monotonic()
    stack.compose("up", "--detach", "--no-deps", "trainer-cpu")
    stack.recreated("trainer-cpu")
    diagnose = lambda: stack.logs("trainer-cpu", "rollout-cpu")  # noqa: E731

    def transfers() -> tuple[bool, str]:
        trainer = stack.metrics("trainer-cpu")
        ok = trainer.value("gd2po_trainer_weight_transfers_total", outcome="ok")
        failed = trainer.value("gd2po_trainer_weight_transfers_total", outcome="failed")
        assert failed == 0, f"{failed:.0f} weight transfers failed\n{diagnose()}"
        return (
            ok >= 4,
            f"{ok:.0f} transfers, policy version {trainer.value('gd2po_trainer_policy_version'):.0f}",
        )

    wait_until("four weight transfers from the recreated trainer", transfers, 900, diagnose=diagnose)
    timeline.record("four broadcast transfers (since the trainer's recreate)", time.monotonic() - started)
    logs = stack.compose("logs", "--no-color", "rollout-cpu").stdout
    received = [
        line
        for line in logs.splitlines()
        if "received from the trainer over gloo" in line and "policy version" in line
    ]
    for replica in (1, 2):  # compose prefixes each line with its container, e.g. `rollout-cpu-2  | …`
        mine = [line for line in received if line.startswith(f"rollout-cpu-{replica} ")]
        assert mine, f"rollout replica {replica} received no version over gloo:\n{logs[-4000:]}"
    for replica in (0, 1):
        rollout = stack.metrics("rollout-cpu", replica)
        assert rollout.value("gd2po_rollout_weight_transfer_failures_total") == 0, replica
        assert rollout.value("gd2po_rollout_weight_reload_failures_total") == 0, replica
        assert rollout.value("gd2po_rollout_policy_version") > before, (replica, before)
    trainer = stack.containers()["trainer-cpu"]
    assert trainer["State"]["Running"] and trainer["RestartCount"] == 0, trainer["State"]


def project_leftovers(engine: DockerEngine) -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={PROJECT}"
    return {
        "containers": engine.docker("ps", "--all", "--quiet", "--filter", label).stdout.split(),
        "volumes": engine.docker("volume", "ls", "--quiet", "--filter", label).stdout.split(),
        "networks": engine.docker("network", "ls", "--quiet", "--filter", label).stdout.split(),
    }


def test_compose_down_v_leaves_nothing(stack: Stack, engine: DockerEngine, timeline: Timeline) -> None:
    """`docker compose down -v`: no container, volume or network of the project, and none at all on the
    engine (the pod-security container was removed too) but Docker's own networks."""
    assert any(project_leftovers(engine).values()), "nothing of the project ran before down"
    started = time.monotonic()
    stack.down()
    timeline.record("compose down -v", time.monotonic() - started)
    assert project_leftovers(engine) == {"containers": [], "volumes": [], "networks": []}
    assert engine.docker("ps", "--all", "--quiet").stdout.split() == []
    assert engine.docker("volume", "ls", "--quiet").stdout.split() == []
    networks = set(engine.docker("network", "ls", "--format", "{{.Name}}").stdout.split())
    assert networks == {"bridge", "host", "none"}, networks


def test_the_engine_stops_by_pid_and_leaves_no_runtime_state(
    engine: DockerEngine, timeline: Timeline
) -> None:
    """SIGTERM to the dockerd PID this test started: no dockerd, containerd or shim of it left, its exec
    root, socket and PID file gone, iptables, ip_forward, docker0 and /etc/docker/key.json as they were
    before; the data root too unless kept as the build cache (GD2PO_DEPLOY_KEEP_CACHE)."""
    pid = engine.pid
    assert pid is not None and pid_alive(pid)
    started = time.monotonic()
    problems = engine.stop(remove_data=not KEEP_CACHE)
    timeline.record("engine stop", time.monotonic() - started)
    assert not problems, problems
    assert not pid_alive(pid)
    assert not Path(f"/proc/{pid}").exists()
    assert KEEP_CACHE or not engine.data_root.exists()
