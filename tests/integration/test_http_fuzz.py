"""Fuzzing what schemathesis does not generate, over real HTTP: request bodies shaped like the reward and
rollout APIs' own, whose values include NaN/±Infinity literals and numbers that overflow a float,
bodies that are not UTF-8 or not JSON, odd content types and bearer credentials (non-ASCII included).
No answer is a 5xx, except the documented 503 of ``/v1/openrlhf`` (an item failed to score). Also
schemathesis over the rollout's schema (the reward service's runs in test_reward_service_schemathesis).

The rollout runs its real API over a stub engine (tests/rollout_stub.py): only HTTP is under test.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import serve
from openapi_tools import homogeneous_tuples
from rollout_stub import stub_rollout_app
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from reward_service.app import create_app
from reward_service.scorers import build_scorer
from reward_service.settings import ServiceSettings

pytestmark = pytest.mark.integration
TOKEN = "fuzz-token"
ROLLOUT_ROOT = Path("/tmp/gd2po-fuzz-weights")  # never created: reloads inside it fail with 409
STATUSES: Counter[tuple[str, int]] = Counter()

# A float literal that overflows to inf in any JSON parser, spliced in as text.
_OVERFLOW = "1e999"
_SENTINEL = 7.25e-300  # a float the JSON writer prints as-is, replaced by _OVERFLOW afterwards

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.just(_SENTINEL),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def maybe(value: st.SearchStrategy) -> st.SearchStrategy:
    """The field's plausible values or, sometimes, any JSON value (wrong types, non-finite numbers)."""
    return st.one_of(value, json_values)


messages = st.lists(
    st.fixed_dictionaries(
        {"role": maybe(st.sampled_from(["system", "user", "assistant", "tool"])), "content": maybe(st.text())}
    ),
    max_size=3,
)
score_item = st.fixed_dictionaries(
    {"id": maybe(st.text(min_size=1, max_size=8)), "prompt": maybe(st.text() | messages)},
    optional={
        "completion": maybe(st.text()),
        "label": maybe(st.text() | st.none()),
        "metadata": st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    },
)
sampling = {
    "max_tokens": maybe(st.integers(-2, 40000)),
    "temperature": maybe(st.floats(allow_nan=True, allow_infinity=True)),
    "top_p": maybe(st.floats(allow_nan=True, allow_infinity=True)),
    "n": maybe(st.integers(-1, 70)),
    "seed": maybe(st.integers(-(2**70), 2**70)),
    "stop": maybe(st.text() | st.lists(st.text(), max_size=3)),
}
BODIES = {
    ("reward", "/v1/score"): st.fixed_dictionaries({"items": maybe(st.lists(score_item, max_size=4))}),
    ("reward", "/v1/openrlhf"): st.fixed_dictionaries(
        {"query": maybe(st.lists(st.text(), max_size=4))},
        optional={
            "prompts": maybe(st.lists(st.text(), max_size=4)),
            "labels": maybe(st.lists(st.text() | st.none(), max_size=4)),
        },
    ),
    ("rollout", "/v1/completions"): st.fixed_dictionaries({"prompt": maybe(st.text())}, optional=sampling),
    ("rollout", "/v1/chat/completions"): st.fixed_dictionaries(
        {"messages": maybe(messages)}, optional=sampling
    ),
    ("rollout", "/v1/weights/reload"): st.fixed_dictionaries(
        {"path": maybe(st.sampled_from([str(ROLLOUT_ROOT / "step-1"), "/etc", "relative"]) | st.text())},
        optional={
            "version": maybe(st.integers(-1, 2**70)),
            "digest": maybe(st.text()),
            "rollback": maybe(st.booleans()),
        },
    ),
}


def render(value: object) -> bytes:
    """JSON text as a lax writer produces it: NaN/Infinity literals and overflowing numbers included."""
    return json.dumps(value, allow_nan=True).replace(repr(_SENTINEL), _OVERFLOW).encode()


raw_bodies = st.one_of(
    st.binary(max_size=64),  # mostly not UTF-8, never JSON
    st.sampled_from([b"\xff\xfe", bytes.fromhex("81a56974656d7390"), b"NaN", b"[1e999]", b'{"a":-Infinity}']),
)
content_types = st.sampled_from(
    [
        "application/json",
        "application/json",
        "application/json; charset=utf-8",
        "application/vnd.api+json",
        "application/msgpack",
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        None,
    ]
)
credentials = st.one_of(
    st.just(f"Bearer {TOKEN}".encode()),
    st.just(f"Bearer {TOKEN}".encode()),
    st.just("Bearer été".encode()),
    st.just("Bearer été".encode("latin-1")),
    # Any visible bytes, UTF-8 or not (HTTP clients refuse control characters in header values).
    st.binary(min_size=1, max_size=24).map(lambda b: b"Bearer " + bytes(c | 0x21 for c in b)),
    st.none(),
)


@pytest.fixture(scope="module")
def urls():
    # Small limits so generated bodies and batches also reach the 413 paths.
    reward = create_app(
        build_scorer("tool_call.correctness"),
        ServiceSettings(max_batch_items=3, max_body_bytes=4096),
        token=TOKEN,
    )
    rollout = stub_rollout_app(token=TOKEN, weights_root=ROLLOUT_ROOT, max_body=4096)
    with (
        serve(reward, ready_path="/readyz") as reward_url,
        serve(rollout, ready_path="/readyz") as rollout_url,
    ):
        yield {"reward": reward_url, "rollout": rollout_url}


def _allowed(service: str, path: str, response: httpx.Response) -> bool:
    if response.status_code < 500:
        return True
    # Documented: /v1/openrlhf answers 503 when an item could not be scored (never a fabricated 0).
    return (service, path) == ("reward", "/v1/openrlhf") and response.status_code == 503


@pytest.mark.parametrize(("service", "path"), sorted(BODIES))
@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hostile_bodies_headers_and_numbers_never_get_a_server_error(
    service: str, path: str, data: st.DataObject, urls: dict[str, str]
) -> None:
    if data.draw(st.integers(0, 3), label="raw") == 0:
        body = data.draw(raw_bodies, label="body")
    else:
        body = render(data.draw(BODIES[service, path], label="json"))
    headers: dict[str, bytes] = {}
    if (content_type := data.draw(content_types, label="content-type")) is not None:
        headers["Content-Type"] = content_type.encode()
    if (credential := data.draw(credentials, label="authorization")) is not None:
        headers["Authorization"] = credential
    response = httpx.post(urls[service] + path, content=body, headers=headers, timeout=30)
    STATUSES[service, response.status_code] += 1
    assert _allowed(service, path, response), (body[:300], headers, response.status_code, response.text)
    if response.headers.get("content-type") == "application/json":  # else the HTTP server's own 400
        json.loads(response.text, parse_constant=lambda c: pytest.fail(f"{c} in the answer"))


def test_report_fuzz_statuses() -> None:
    """Prints how many cases each service answered with each status (run with -s to see it)."""
    print("fuzz statuses:", dict(sorted(STATUSES.items())), "total:", sum(STATUSES.values()))
    assert not any(code >= 500 and code != 503 for _, code in STATUSES)


rollout_schema = schemathesis.openapi.from_dict(
    homogeneous_tuples(stub_rollout_app(token=TOKEN, weights_root=ROLLOUT_ROOT).openapi())
)


@pytest.fixture(scope="module")
def rollout_url(urls: dict[str, str]) -> str:
    return urls["rollout"]


@rollout_schema.parametrize()
@settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_rollout_api_schemathesis_no_server_errors_and_only_documented_responses(
    case: schemathesis.Case, rollout_url: str
) -> None:
    case.call_and_validate(
        base_url=rollout_url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
