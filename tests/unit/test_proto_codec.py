"""Codec round trips for every wire message, version refusal, and validation of bad tables."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from proto import (
    SCHEMA_VERSION,
    Completion,
    DeadLetter,
    OpenRLHFRequest,
    OpenRLHFResponse,
    PolicyAnnouncement,
    PromptRecord,
    RewardInfo,
    SchemaVersionError,
    ScoredGroup,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
    WeightOffer,
    WeightRequest,
    deadletter,
    decode,
    encode,
)
from proto.codec import CodecError
from proto.messages import WIRE_MODELS

finite = st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-1e6, max_value=1e6)
logprob = st.floats(min_value=-50.0, max_value=0.0, allow_nan=False)
ident = st.text(min_size=1, max_size=24)
text = st.text(max_size=40)
messages = st.lists(
    st.builds(dict, role=st.sampled_from(["system", "user", "assistant"]), content=text),
    min_size=1,
    max_size=3,
)


@st.composite
def completions(draw: st.DrawFn) -> Completion:
    n = draw(st.integers(0, 12))
    return Completion(
        token_ids=draw(st.lists(st.integers(0, 50_000), min_size=n, max_size=n)),
        logprobs=draw(st.lists(logprob, min_size=n, max_size=n)),
        text=draw(text),
        finish_reason=draw(st.sampled_from(["stop", "length", "abort"])),
    )


@st.composite
def scored_groups(draw: st.DrawFn) -> ScoredGroup:
    group = draw(st.lists(completions(), min_size=1, max_size=5))
    names = draw(
        st.lists(st.sampled_from(["correctness", "format", "length", "helpful"]), min_size=1, unique=True)
    )
    return ScoredGroup(
        group_id=draw(ident),
        prompt_id=draw(ident),
        prompt_token_ids=draw(st.lists(st.integers(0, 50_000), min_size=1, max_size=20)),
        completions=group,
        rewards={name: draw(st.lists(finite, min_size=len(group), max_size=len(group))) for name in names},
        policy_version=draw(st.integers(0, 10_000)),
        created_at=draw(finite),
        scored_at=draw(finite),
        producer_id=draw(text),
        metadata=draw(
            st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**63 - 1) | text, max_size=3)
        ),
    )


@st.composite
def score_results(draw: st.DrawFn) -> ScoreResult:
    if draw(st.booleans()):
        return ScoreResult(id=draw(ident), score=draw(finite), status="ok")
    return ScoreResult(id=draw(ident), status="error", error=draw(st.text(min_size=1, max_size=30)))


@st.composite
def dead_letters(draw: st.DrawFn) -> DeadLetter:
    """Each producer's dead letter: the rollout's reward failure, the trainer's untrainable group and its
    undecodable entry (bytes of any kind)."""
    kind = draw(st.sampled_from(["reward_failed", "untrainable", "undecodable"]))
    reason = draw(st.text(min_size=1, max_size=30))
    if kind == "untrainable":
        return deadletter.untrainable(draw(scored_groups()), reason, source="trainer", entry_id="1-0")
    if kind == "undecodable":
        raw = draw(st.binary(max_size=64) | scored_groups().map(encode))
        return deadletter.undecodable({b"msg": raw}, reason, source="trainer", entry_id="1-1")
    return DeadLetter(
        kind="reward_failed",
        reason=reason,
        source="rollout",
        dead_at=draw(finite),
        failed_rewards=draw(st.lists(ident, min_size=1, max_size=2)),
        group_id=draw(ident),
        prompt_id=draw(ident),
        prompt_token_ids=draw(st.lists(st.integers(0, 50_000), max_size=5)),
        completions=draw(st.lists(completions(), max_size=2)),
        rewards=draw(st.dictionaries(ident, st.lists(finite, max_size=2), max_size=2)),
        policy_version=draw(st.integers(0, 100)),
        created_at=draw(finite),
    )


STRATEGIES: dict[type[BaseModel], st.SearchStrategy] = {
    PromptRecord: st.builds(
        PromptRecord, prompt_id=ident, messages=messages, label=st.none() | text, data_source=text
    ),
    Completion: completions(),
    ScoreItem: st.builds(
        ScoreItem, id=ident, prompt=text | messages, completion=text, label=st.none() | text
    ),
    ScoreRequest: st.lists(
        st.builds(ScoreItem, id=ident, prompt=text, completion=text),
        min_size=1,
        max_size=4,
        unique_by=lambda i: i.id,
    ).map(lambda items: ScoreRequest(items=items)),
    ScoreResult: score_results(),
    ScoreResponse: st.builds(
        ScoreResponse, reward=ident, version=ident, results=st.lists(score_results(), max_size=4)
    ),
    RewardInfo: st.builds(
        RewardInfo,
        name=ident,
        version=ident,
        range=st.none() | st.tuples(finite, finite),
        model_id=st.none() | ident,
    ),
    OpenRLHFRequest: st.lists(text, min_size=1, max_size=4).map(
        lambda q: OpenRLHFRequest(query=q, labels=[None] * len(q))
    ),
    OpenRLHFResponse: st.builds(OpenRLHFResponse, rewards=st.lists(finite, max_size=5)),
    ScoredGroup: scored_groups(),
    DeadLetter: dead_letters(),
    PolicyAnnouncement: st.builds(
        PolicyAnnouncement,
        version=st.integers(0, 1000),
        path=ident,
        digest=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64).map("blake3:".__add__),
        step=st.integers(0, 1000),
        created_at=finite,
    ),
    WeightOffer: st.builds(
        WeightOffer,
        version=st.integers(0, 1000),
        digest=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64).map("blake3:".__add__),
        step=st.integers(0, 1000),
        host=ident,
        port=st.integers(1, 65535),
        created_at=finite,
    ),
    WeightRequest: st.builds(
        WeightRequest,
        producer_id=ident,
        nonce=st.text(alphabet="0123456789abcdef", min_size=8, max_size=64),
        version=st.integers(0, 1000),
        created_at=finite,
    ),
}


def test_every_wire_model_has_a_strategy() -> None:
    assert set(STRATEGIES) == set(WIRE_MODELS)


@pytest.mark.parametrize("model", WIRE_MODELS, ids=lambda m: m.__name__)
def test_round_trip(model: type[BaseModel]) -> None:
    @settings(max_examples=40, deadline=None)
    @given(STRATEGIES[model])
    def check(message: BaseModel) -> None:
        assert decode(encode(message), model) == message

    check()


def _group(**changes: object) -> dict:
    base = {
        "group_id": "g",
        "prompt_id": "p",
        "prompt_token_ids": [1, 2],
        "completions": [
            {"token_ids": [3], "logprobs": [-0.1], "text": "a", "finish_reason": "stop"},
            {"token_ids": [4, 5], "logprobs": [-0.2, -0.3], "text": "b", "finish_reason": "length"},
        ],
        "rewards": {"correctness": [1.0, -1.0], "length": [0.2, 0.4]},
        "policy_version": 0,
        "created_at": 0.0,
        "scored_at": 1.0,
    }
    base.update(changes)
    return base


def test_encoded_envelope_carries_schema_version_and_type() -> None:
    envelope = msgpack.unpackb(encode(ScoredGroup(**_group())))
    assert envelope["v"] == SCHEMA_VERSION
    assert envelope["type"] == "ScoredGroup"


def test_unknown_major_version_is_refused_with_a_clear_error() -> None:
    envelope = msgpack.unpackb(encode(ScoredGroup(**_group())))
    envelope["v"] = "1.0"  # before PolicyAnnouncement.sha256 became digest
    with pytest.raises(SchemaVersionError, match=r"'1\.0'.*major version 2"):
        decode(msgpack.packb(envelope), ScoredGroup)


def test_newer_minor_version_with_extra_fields_is_accepted() -> None:
    envelope = msgpack.unpackb(encode(ScoredGroup(**_group())))
    envelope["v"] = "2.7"
    envelope["body"]["a_future_field"] = 42
    assert decode(msgpack.packb(envelope), ScoredGroup).group_id == "g"


def test_out_of_range_integers_fail_with_a_codec_error() -> None:
    with pytest.raises(CodecError, match="ScoredGroup cannot be encoded"):
        encode(ScoredGroup(**_group(metadata={"big": 2**70})))


def test_wrong_message_type_and_garbage_are_refused() -> None:
    with pytest.raises(CodecError, match="expected a PolicyAnnouncement"):
        decode(encode(ScoredGroup(**_group())), PolicyAnnouncement)
    with pytest.raises(CodecError, match="not a gd2po envelope"):
        decode(msgpack.packb([1, 2, 3]), ScoredGroup)
    with pytest.raises(CodecError):
        decode(b"\xc1", ScoredGroup)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rewards_are_rejected(bad: float) -> None:
    with pytest.raises(ValidationError, match="rewards.correctness"):
        ScoredGroup(**_group(rewards={"correctness": [1.0, bad], "length": [0.1, 0.2]}))


def test_non_finite_reward_is_rejected_on_decode_too() -> None:
    envelope = msgpack.unpackb(encode(ScoredGroup(**_group())))
    envelope["body"]["rewards"]["length"][0] = math.nan
    with pytest.raises(ValidationError):
        decode(msgpack.packb(envelope), ScoredGroup)


def test_reward_table_must_be_k_by_g() -> None:
    with pytest.raises(ValidationError, match=r"rewards\['length'\] has 3 scores but the group has 2"):
        ScoredGroup(**_group(rewards={"correctness": [1.0, 0.0], "length": [0.1, 0.2, 0.3]}))


def test_empty_group_and_empty_table_are_rejected() -> None:
    with pytest.raises(ValidationError, match="completions"):
        ScoredGroup(**_group(completions=[], rewards={"correctness": []}))
    with pytest.raises(ValidationError, match="rewards"):
        ScoredGroup(**_group(rewards={}))


def test_completion_logprobs_must_align_with_tokens() -> None:
    with pytest.raises(ValidationError, match="logprobs has 1 entries but token_ids has 2"):
        Completion(token_ids=[1, 2], logprobs=[-0.1], text="x", finish_reason="stop")


def test_score_result_status_and_score_agree() -> None:
    with pytest.raises(ValidationError, match="status 'error' needs"):
        ScoreResult(id="a", score=0.0, status="error", error="boom")
    with pytest.raises(ValidationError, match="status 'ok' needs"):
        ScoreResult(id="a", score=None, status="ok")
    with pytest.raises(ValidationError):
        ScoreResult(id="a", score=math.nan, status="ok")


def test_score_request_rejects_duplicates_unknown_fields_and_empty_batches() -> None:
    with pytest.raises(ValidationError, match="duplicate id 'x'"):
        ScoreRequest(items=[ScoreItem(id="x", prompt="p", completion="c")] * 2)
    with pytest.raises(ValidationError, match="items.0.complettion"):
        ScoreRequest.model_validate({"items": [{"id": "x", "prompt": "p", "complettion": "c"}]})
    with pytest.raises(ValidationError, match="items"):
        ScoreRequest(items=[])


def test_openrlhf_lengths_must_match() -> None:
    with pytest.raises(ValidationError, match="labels has 1 entries but query has 2"):
        OpenRLHFRequest(query=["a", "b"], labels=["x"])


@pytest.mark.parametrize("digest", ["xyz", "0" * 64, "sha256:" + "0" * 64, "blake3:" + "A" * 64])
def test_policy_announcement_needs_a_blake3_hex_digest(digest: str) -> None:
    with pytest.raises(ValidationError, match="digest must be 'blake3:'"):
        PolicyAnnouncement(version=1, path="/w", digest=digest, step=1, created_at=0.0)


def test_a_schema_2_0_dead_letter_still_reads():
    """Before 2.1 only the rollout wrote DeadLetters (reward failures, partial scores in partial_rewards)."""
    body = {
        "group_id": "g",
        "prompt_id": "p",
        "reason": "correctness: failed after 4 attempts",
        "failed_rewards": ["correctness"],
        "policy_version": 3,
        "producer_id": "r",
        "created_at": 1.0,
        "completions": [],
        "partial_rewards": {"length": [0.5]},
    }
    letter = decode(msgpack.packb({"v": "2.0", "type": "DeadLetter", "body": body}), DeadLetter)
    assert (letter.kind, letter.failed_rewards, letter.rewards) == (
        "reward_failed",
        ["correctness"],
        {"length": [0.5]},
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "reward_failed", "group_id": "g"}, "needs group_id and failed_rewards"),
        ({"kind": "untrainable", "group_id": "g"}, "keeps the group"),
        ({"kind": "undecodable"}, "keeps the bytes in raw"),
    ],
)
def test_a_dead_letter_is_complete_for_its_kind(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DeadLetter(reason="r", **fields)


def test_undecodable_bytes_name_their_group_when_the_envelope_is_readable():
    envelope = msgpack.unpackb(encode(ScoredGroup(**_group(policy_version=7))))
    envelope["body"]["rewards"]["length"][0] = math.nan
    letter = deadletter.undecodable({b"msg": msgpack.packb(envelope)}, "nan", source="trainer")
    assert (letter.group_id, letter.prompt_id, letter.policy_version) == ("g", "p", 7)
    assert deadletter.raw_bytes(letter) == msgpack.packb(envelope)
    garbage = deadletter.undecodable({b"msg": msgpack.packb({"body": {"group_id": 5}})}, "x", source="t")
    assert garbage.group_id is None and garbage.policy_version is None
