"""The Helm chart lints, renders manifests that pass `kubernetes-validate --strict`, and turns every
`values.rewards` entry into its own Deployment + Service."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from deploy_tools import CHART, DEPLOY, helm, helm_env, promtool, run, venv_tool

from proto.config import load_config

EXAMPLE = DEPLOY / "helm" / "examples" / "cpu-external-redis.yaml"
# A trainer on four nodes of two ranks each: one torchrun pod per node (see the multi-node tests below).
MULTI_NODE = ["--set", "trainer.nodes=4", "--set", "trainer.nprocPerNode=2"]
# Weights over gloo from the trainer's rank 0 (here on four nodes: rank 0 may run in any pod).
BROADCAST = ["--set", "experiment.trainer.publish.transport=broadcast", *MULTI_NODE]
VALUE_SETS = {
    "default": [],
    "example": ["-f", str(EXAMPLE)],
    "multi-node": MULTI_NODE,
    "broadcast": BROADCAST,
}


def render(tmp_path: Path, *args: str) -> list[dict]:
    result = run([helm(), "template", "rel", str(CHART), *args], env=helm_env(tmp_path))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    workloads = by_kind(docs, "Deployment") | by_kind(docs, "StatefulSet")
    return {name: doc["spec"]["template"]["spec"] for name, doc in workloads.items()}


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_helm_lint_is_clean(tmp_path: Path, values: str) -> None:
    result = run([helm(), "lint", "--strict", str(CHART), *VALUE_SETS[values]], env=helm_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_helm_install_client_dry_run_renders_the_release(tmp_path: Path, values: str) -> None:
    """`helm install --dry-run=client` is what an operator runs first: beyond `helm template` it renders
    NOTES.txt, runs the install-time branches (`lookup` of the generated Secret finds nothing) and
    reports the release. No cluster here, so KUBECONFIG points at nothing and the client must not need one."""
    env = {**helm_env(tmp_path), "KUBECONFIG": str(tmp_path / "no-cluster")}
    args = [
        helm(),
        "install",
        "rel",
        str(CHART),
        "--dry-run=client",
        "--namespace",
        "ml",
        *VALUE_SETS[values],
    ]
    result = run(args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    head, _, rest = result.stdout.partition("MANIFEST:")
    manifest, _, notes = rest.partition("NOTES:")
    assert "STATUS: pending-install" in head and "NAMESPACE: ml" in head, head
    installed = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(manifest) if d)
    templated = sorted((d["kind"], d["metadata"]["name"]) for d in render(tmp_path, *VALUE_SETS[values]))
    assert installed == templated
    secret = [d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "Secret"]
    # The chart generates the secrets on install; the example values bring an existing Secret instead.
    assert len(secret) == (values != "example")
    assert all(len(d["data"]["api-token"]) >= 32 for d in secret), secret
    assert "kubectl -n ml logs -f statefulset/rel-gd2po-trainer" in notes, notes


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_rendered_manifests_pass_kubernetes_validate_strict(tmp_path: Path, values: str) -> None:
    docs = render(tmp_path, *VALUE_SETS[values])
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    result = run([venv_tool("kubernetes-validate"), "--strict", "--quiet", str(manifest)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_rendered_experiment_config_loads(tmp_path: Path, values: str) -> None:
    (configmap,) = by_kind(render(tmp_path, *VALUE_SETS[values]), "ConfigMap").values()
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"])
    config = load_config(path)
    assert config.redis.password is None  # secrets come from the Secret, never the ConfigMap
    assert config.rewards


def reward_values(tmp_path: Path, rewards: list[dict]) -> list[str]:
    path = tmp_path / "rewards.yaml"
    path.write_text(yaml.safe_dump({"rewards": rewards}))
    return ["-f", str(path)]


TOOL_CALLING_REWARDS = [
    {"name": "correctness", "scorer": "tool_call.correctness", "replicas": 2},
    {"name": "format", "scorer": "tool_call.format"},
]
SWAPPED_REWARDS = [
    {
        "name": "helpful_rm",
        "scorer": "model.sequence_classifier",
        "replicas": 3,
        "options": {"model_path": "/models/rm"},
        "resources": {"limits": {"nvidia.com/gpu": 1}},
    },
    {
        "name": "judge",
        "image": {"repository": "acme/judge", "tag": "1.2"},
        "command": ["serve", "--port", "8000"],
    },
    {"name": "length", "url": "http://length.shared.svc:9000"},  # runs elsewhere: no Deployment
]


def test_each_reward_entry_becomes_a_deployment_and_service(tmp_path: Path) -> None:
    first = render(tmp_path, *reward_values(tmp_path, TOOL_CALLING_REWARDS))
    second = render(tmp_path, *reward_values(tmp_path, SWAPPED_REWARDS))

    deployments = {n: d for n, d in by_kind(first, "Deployment").items() if "reward" in n}
    assert {n: d["spec"]["replicas"] for n, d in deployments.items()} == {
        "rel-gd2po-reward-correctness": 2,
        "rel-gd2po-reward-format": 1,
    }
    container = deployments["rel-gd2po-reward-format"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["reward", "format"] and container["image"] == "gd2po:gpu"
    assert {n for n in by_kind(first, "Service") if "reward" in n} == set(deployments)

    deployments = {n: d for n, d in by_kind(second, "Deployment").items() if "reward" in n}
    assert set(deployments) == {"rel-gd2po-reward-helpful-rm", "rel-gd2po-reward-judge"}
    assert {n for n in by_kind(second, "Service") if "reward" in n} == set(deployments)
    helpful = deployments["rel-gd2po-reward-helpful-rm"]
    assert helpful["spec"]["replicas"] == 3
    assert helpful["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "limits": {"nvidia.com/gpu": 1}
    }
    judge = deployments["rel-gd2po-reward-judge"]["spec"]["template"]["spec"]["containers"][0]
    assert judge["image"] == "acme/judge:1.2" and judge["args"] == ["serve", "--port", "8000"]

    (configmap,) = by_kind(second, "ConfigMap").values()
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    assert {r["name"]: r["url"] for r in config["rewards"]} == {
        "helpful_rm": "http://rel-gd2po-reward-helpful-rm:8000",
        "judge": "http://rel-gd2po-reward-judge:8000",
        "length": "http://length.shared.svc:9000",
    }
    assert config["rewards"][0]["launch"] == {
        "scorer": "model.sequence_classifier",
        "options": {"model_path": "/models/rm"},
    }


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_pods_run_non_root_with_health_probes(tmp_path: Path, values: str) -> None:
    for name, spec in pod_specs(render(tmp_path, *VALUE_SETS[values])).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
        main = spec["containers"][0]
        if "redis" not in name:
            assert main["livenessProbe"]["httpGet"]["path"] == "/healthz", name
            assert main["readinessProbe"]["httpGet"]["path"] == "/readyz", name


def test_default_values_run_redis_and_gpus(tmp_path: Path) -> None:
    docs = render(tmp_path)
    assert {"rel-gd2po-trainer", "rel-gd2po-redis"} <= set(by_kind(docs, "StatefulSet"))
    specs = pod_specs(docs)
    for name in ("rel-gd2po-trainer", "rel-gd2po-rollout"):
        assert specs[name]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        volumes = {v["name"]: v for v in specs[name]["volumes"]}
        assert volumes["weights"]["persistentVolumeClaim"]["claimName"] == "rel-gd2po-weights"
    redis_args = specs["rel-gd2po-redis"]["containers"][0]["args"]
    assert redis_args[:2] == ["--appendonly", "yes"] and "$(REDIS_PASSWORD)" in redis_args
    assert set(by_kind(docs, "Secret")["rel-gd2po-secrets"]["data"]) == {"redis-password", "api-token"}
    assert not by_kind(docs, "ServiceMonitor")


def test_example_values_use_external_redis_and_a_service_monitor(tmp_path: Path) -> None:
    docs = render(tmp_path, *VALUE_SETS["example"])
    assert "rel-gd2po-redis" not in by_kind(docs, "StatefulSet") and not by_kind(docs, "Secret")
    specs = pod_specs(docs)
    assert "nvidia.com/gpu" not in specs["rel-gd2po-trainer"]["containers"][0]["resources"]["limits"]
    # kubernetes-validate has no schema for this CRD: check it selects every gd2po Service's http port.
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = {
        name
        for name, service in by_kind(docs, "Service").items()
        if selector.items() <= service["metadata"]["labels"].items()
        and "http" in {port["name"] for port in service["spec"]["ports"]}
    }
    assert scraped == {
        "rel-gd2po-trainer",
        "rel-gd2po-rollout",
        "rel-gd2po-reward-correctness",
        "rel-gd2po-reward-has-tool-call",
    }
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_example_values_ship_the_prometheus_rules_as_a_prometheus_rule(tmp_path: Path) -> None:
    (rule,) = by_kind(render(tmp_path, *VALUE_SETS["example"]), "PrometheusRule").values()
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    shipped = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "gd2po.rules.yml").read_text())
    assert rule["spec"]["groups"] == shipped["groups"]  # Prometheus {{ $value }} templates left alone
    rendered = tmp_path / "rendered.rules.yml"
    rendered.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = run([promtool(), "check", "rules", str(rendered)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert not by_kind(render(tmp_path), "PrometheusRule")  # off by default: needs the operator's CRDs


def test_network_policies_allow_only_the_needed_flows(tmp_path: Path) -> None:
    policies = by_kind(render(tmp_path), "NetworkPolicy")
    assert set(policies) == {f"rel-gd2po-{c}" for c in ("trainer", "rollout", "rewards", "redis")}
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    redis_from = policies["rel-gd2po-redis"]["spec"]["ingress"][0]["from"]
    assert {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in redis_from} == {
        "trainer",
        "rollout",
    }
    assert policies["rel-gd2po-redis"]["spec"]["egress"] == []
    reward_from = policies["rel-gd2po-rewards"]["spec"]["ingress"][0]["from"]
    assert reward_from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "rollout"
    rollout_to = [
        rule.get("to", [{}])[0].get("podSelector", {})
        for rule in policies["rel-gd2po-rollout"]["spec"]["egress"]
    ]
    assert {"app.kubernetes.io/instance": "rel", "gd2po.io/role": "reward"} in [
        s.get("matchLabels") for s in rollout_to
    ]


def test_values_schema_rejects_a_misspelt_reward_key(tmp_path: Path) -> None:
    values = reward_values(tmp_path, [{"name": "format", "scorer": "tool_call.format", "replica": 2}])
    result = run([helm(), "template", "rel", str(CHART), *values], env=helm_env(tmp_path))
    assert result.returncode != 0 and "'replica' not allowed" in result.stderr


def trainer_objects(docs: list[dict]) -> tuple[dict, dict, list[str]]:
    """The trainer StatefulSet, its container and that container's args."""
    statefulset = by_kind(docs, "StatefulSet")["rel-gd2po-trainer"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return statefulset, container, container["args"]


def flags(args: list[str]) -> dict[str, str]:
    """torchrun's ``--flag value`` pairs, up to the ``-m`` that starts the program's own args."""
    head = args[1 : args.index("-m")]
    assert len(head) % 2 == 0 and all(a.startswith("--") for a in head[::2]), head
    return dict(zip(head[::2], head[1::2], strict=True))


def test_single_node_trainer_renders_as_before(tmp_path: Path) -> None:
    """trainer.nodes 1 (the default) keeps the single pod of plain `trainer`: no torchrun, no rendezvous,
    the StatefulSet's fields as before (podManagementPolicy and serviceName are immutable)."""
    docs = render(tmp_path)
    statefulset, container, args = trainer_objects(docs)
    assert args == ["trainer", "--resume"]
    assert statefulset["spec"]["replicas"] == 1
    assert statefulset["spec"]["serviceName"] == "rel-gd2po-trainer"
    assert "podManagementPolicy" not in statefulset["spec"]  # OrderedReady, as existing releases have it
    assert "rel-gd2po-trainer-nodes" not in by_kind(docs, "Service")
    assert {e["name"] for e in container["env"]}.isdisjoint({"GD2PO_NODE_RANK"})
    assert [p["name"] for p in container["ports"]] == ["http"]
    # One node, several ranks: torchrun on the pod alone, as before.
    _, _, args = trainer_objects(render(tmp_path, "--set", "trainer.nprocPerNode=4"))
    assert args == [
        "torchrun",
        "--nproc-per-node",
        "4",
        "-m",
        "trainer",
        "--config",
        "/etc/gd2po/config.yaml",
        "--resume",
    ]


def test_multi_node_trainer_is_one_torchrun_pod_per_node(tmp_path: Path) -> None:
    docs = render(tmp_path, *MULTI_NODE)
    statefulset, container, args = trainer_objects(docs)
    spec = statefulset["spec"]
    assert spec["replicas"] == 4 and spec["podManagementPolicy"] == "Parallel"

    # Pod 0's stable name: <statefulset>-0.<governing headless Service>, resolvable before it is ready.
    services = by_kind(docs, "Service")
    nodes = services[spec["serviceName"]]
    assert spec["serviceName"] == "rel-gd2po-trainer-nodes"
    assert nodes["spec"]["clusterIP"] == "None" and nodes["spec"]["publishNotReadyAddresses"] is True
    pod_labels = spec["template"]["metadata"]["labels"]
    assert nodes["spec"]["selector"].items() <= pod_labels.items()
    (rendezvous,) = nodes["spec"]["ports"]
    # Prometheus keeps scraping ready pods through the metrics Service only.
    assert "gd2po.io/metrics" not in nodes["metadata"]["labels"]
    assert services["rel-gd2po-trainer"]["metadata"]["labels"]["gd2po.io/metrics"] == "true"

    assert args[0] == "torchrun"
    torchrun = flags(args)
    assert torchrun == {
        "--nnodes": "4",
        "--nproc-per-node": "2",
        "--node-rank": "$(GD2PO_NODE_RANK)",
        "--rdzv-backend": "c10d",
        "--rdzv-endpoint": f"rel-gd2po-trainer-0.rel-gd2po-trainer-nodes:{rendezvous['port']}",
        "--rdzv-id": "rel",
        "--max-restarts": "0",
    }
    assert args[args.index("-m") :] == ["-m", "trainer", "--config", "/etc/gd2po/config.yaml", "--resume"]
    # The node rank is the pod's ordinal, from the label the StatefulSet controller sets (Kubernetes ≥ 1.28).
    env = {e["name"]: e for e in container["env"]}
    assert env["GD2PO_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["rendezvous"] == rendezvous["port"] and rendezvous["targetPort"] == "rendezvous"

    # Trainer pods reach each other on every port (rendezvous, then torch.distributed's own ports).
    policy = by_kind(docs, "NetworkPolicy")["rel-gd2po-trainer"]["spec"]
    peer = {"podSelector": {"matchLabels": nodes["spec"]["selector"]}}
    assert {"from": [peer]} in policy["ingress"] and {"to": [peer]} in policy["egress"]
    single = by_kind(render(tmp_path), "NetworkPolicy")["rel-gd2po-trainer"]["spec"]
    assert {"from": [peer]} not in single["ingress"] and {"to": [peer]} not in single["egress"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Every node writes its ZeRO checkpoint shards to the weights volume and reads them all on resume.
        (["--set", "weights.accessModes={ReadWriteOnce}"], "weights.accessModes must include ReadWriteMany"),
        (["--kube-version", "1.27.3"], "needs Kubernetes >= 1.28"),  # no pod-index label to rank nodes by
    ],
    ids=["read-write-once-weights", "kubernetes-1.27"],
)
def test_multi_node_trainer_refuses_what_cannot_run(tmp_path: Path, args: list[str], message: str) -> None:
    result = run([helm(), "template", "rel", str(CHART), *MULTI_NODE, *args], env=helm_env(tmp_path))
    assert result.returncode != 0 and message in result.stderr, result.stderr
    # The same values with one node are fine: the refusal is about several nodes.
    result = run([helm(), "template", "rel", str(CHART), *args], env=helm_env(tmp_path))
    assert result.returncode == 0, result.stderr


def test_values_schema_rejects_a_trainer_with_no_nodes(tmp_path: Path) -> None:
    result = run([helm(), "template", "rel", str(CHART), "--set", "trainer.nodes=0"], env=helm_env(tmp_path))
    assert result.returncode != 0 and "/trainer/nodes" in result.stderr, result.stderr


def selector(component: str) -> dict:
    """The NetworkPolicy peer of one component's pods in release ``rel``."""
    labels = {"app.kubernetes.io/name": "gd2po", "app.kubernetes.io/instance": "rel"}
    return {"podSelector": {"matchLabels": {**labels, "app.kubernetes.io/component": component}}}


def test_broadcast_weights_open_the_trainer_store_to_the_rollouts(tmp_path: Path) -> None:
    """``experiment.trainer.publish.transport: broadcast``: every trainer pod binds its weight store on
    ``trainer.broadcastPort`` and advertises its own pod IP (rank 0 may run in any pod of a multi-node
    trainer), and the NetworkPolicies let trainer and rollout pods reach each other on every port (the
    store, then gloo's own ports, either direction). With the default ``disk`` none of it is rendered."""
    docs = render(tmp_path, *BROADCAST)
    _, container, _ = trainer_objects(docs)
    env = {e["name"]: e for e in container["env"]}
    assert env["GD2PO_TRAINER__PUBLISH__BROADCAST__HOST"]["value"] == "0.0.0.0"
    assert env["GD2PO_TRAINER__PUBLISH__BROADCAST__PORT"]["value"] == "29500"
    assert env["GD2PO_TRAINER__PUBLISH__BROADCAST__ADVERTISE"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "status.podIP"
    )
    assert {"name": "weights", "containerPort": 29500} in container["ports"]
    (configmap,) = by_kind(docs, "ConfigMap").values()
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"])
    assert load_config(path).trainer.publish.transport == "broadcast"

    policies = by_kind(docs, "NetworkPolicy")
    trainer, rollout = policies["rel-gd2po-trainer"]["spec"], policies["rel-gd2po-rollout"]["spec"]
    assert {"from": [selector("rollout")]} in trainer["ingress"] and {"to": [selector("rollout")]} in trainer[
        "egress"
    ]
    assert {"from": [selector("trainer")]} in rollout["ingress"] and {"to": [selector("trainer")]} in rollout[
        "egress"
    ]

    _, disk_container, _ = trainer_objects(disk := render(tmp_path, *MULTI_NODE))
    assert not any(e["name"].startswith("GD2PO_TRAINER__PUBLISH__") for e in disk_container["env"])
    assert "weights" not in {p["name"] for p in disk_container["ports"]}
    disk_policies = by_kind(disk, "NetworkPolicy")
    assert {"from": [selector("rollout")]} not in disk_policies["rel-gd2po-trainer"]["spec"]["ingress"]
    assert {"to": [selector("trainer")]} not in disk_policies["rel-gd2po-rollout"]["spec"]["egress"]
