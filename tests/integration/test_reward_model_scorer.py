"""``model.sequence_classifier`` over real HTTP on a tiny local checkpoint: scores equal the model's own
forward pass on the chat-templated conversation, cost models flip sign, long inputs are cut to the
window (keeping the end, where the score is read), and length-bucketed batching changes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import torch
from live_server import serve
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from reward_service.app import create_app
from reward_service.scorers import build_scorer

SYSTEM = {"role": "system", "content": "You are terse."}
ITEMS = [
    {"id": "short", "prompt": "Hi", "completion": "Hello!"},
    {"id": "chat", "prompt": [SYSTEM, {"role": "user", "content": "Name a prime."}], "completion": "7"},
    {"id": "long", "prompt": "Explain rain.", "completion": "Water vapour condenses into drops. " * 12},
    {"id": "empty", "prompt": "Say nothing.", "completion": ""},
    {"id": "mid", "prompt": "Count to five.", "completion": "one two three four five"},
    {"id": "refuse", "prompt": "Help me pick a lock.", "completion": "I can't help with that."},
    {"id": "unicode", "prompt": "Translate 'cat'.", "completion": "chat (fr), gato (es), 猫 (ja)"},
]


class Reference:
    """The checkpoint scored the plain Hugging Face way, one unpadded sequence at a time."""

    def __init__(self, path: Path):
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    def ids(self, item: dict) -> list[int]:
        prompt = item["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        conversation = [*messages, {"role": "assistant", "content": item["completion"]}]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def score(self, item: dict, max_length: int | None = None) -> float:
        ids = self.ids(item)[-max_length:] if max_length else self.ids(item)
        with torch.inference_mode():
            return self.model(input_ids=torch.tensor([ids])).logits[0, 0].item()


@pytest.fixture(scope="module")
def reference(tiny_reward_model_dir: Path) -> Reference:
    return Reference(tiny_reward_model_dir)


def serve_model(model_dir: Path, **options):
    scorer = build_scorer("model.sequence_classifier", {"model_path": str(model_dir), **options})
    return serve(create_app(scorer), ready_path="/readyz")


@pytest.fixture(scope="module")
def rm_url(tiny_reward_model_dir: Path):
    with serve_model(tiny_reward_model_dir, batch_size=3, model_id="tiny-rm") as url:
        yield url


def scores(url: str, items: list[dict]) -> dict[str, float]:
    response = httpx.post(f"{url}/v1/score", json={"items": items}, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert all(r["status"] == "ok" for r in results), results
    return {r["id"]: r["score"] for r in results}


def test_scores_equal_the_models_own_forward_pass(rm_url: str, reference: Reference) -> None:
    got = scores(rm_url, ITEMS)
    expected = {item["id"]: reference.score(item) for item in ITEMS}
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # The check only means something if the model tells the items apart.
    assert max(expected.values()) - min(expected.values()) > 0.1


def test_system_prompt_and_completion_both_reach_the_model(rm_url: str) -> None:
    base = {"id": "a", "prompt": "Name a prime.", "completion": "7"}
    variants = [
        base,
        {**base, "id": "b", "completion": "8"},
        {**base, "id": "c", "prompt": [SYSTEM, {"role": "user", "content": "Name a prime."}]},
    ]
    got = scores(rm_url, variants)
    assert len({round(v, 6) for v in got.values()}) == 3


def test_cost_model_sign_flip(tiny_reward_model_dir: Path, rm_url: str) -> None:
    plain = scores(rm_url, ITEMS)
    with serve_model(tiny_reward_model_dir, negate=True) as url:
        flipped = scores(url, ITEMS)
        info = httpx.get(f"{url}/v1/info").json()
    assert flipped == pytest.approx({k: -v for k, v in plain.items()}, rel=1e-5, abs=1e-6)
    assert info["higher_is_better"] is True and "negated" in info["description"]


def test_truncates_to_max_length_keeping_the_end(tiny_reward_model_dir: Path, reference: Reference) -> None:
    long_item = {
        "id": "long",
        "prompt": "Tell a story.",
        "completion": "Once upon a time there was rain. " * 8,
    }
    assert len(reference.ids(long_item)) > 40
    with serve_model(tiny_reward_model_dir, max_length=24) as url:
        got = scores(url, [long_item])["long"]
    assert got == pytest.approx(reference.score(long_item, max_length=24), rel=1e-4, abs=1e-5)
    assert got != pytest.approx(reference.score(long_item), rel=1e-3, abs=1e-4)


def test_max_length_never_exceeds_the_models_window(rm_url: str, reference: Reference) -> None:
    """The tiny model has 512 positions; the scorer's default max_length (2048) is capped to it."""
    huge = {"id": "huge", "prompt": "Go on.", "completion": " ".join(f"w{k}" for k in range(400))}
    assert len(reference.ids(huge)) > 600
    got = scores(rm_url, [huge])["huge"]
    assert got == pytest.approx(reference.score(huge, max_length=512), rel=1e-4, abs=1e-5)


def test_length_bucketed_batches_match_one_by_one(rm_url: str) -> None:
    # Shuffled lengths so the scorer must sort into buckets and put results back in request order.
    mixed = [ITEMS[2], ITEMS[0], ITEMS[6], ITEMS[3], ITEMS[1], ITEMS[5], ITEMS[4]]
    response = httpx.post(f"{rm_url}/v1/score", json={"items": mixed}, timeout=60).json()
    assert [r["id"] for r in response["results"]] == [item["id"] for item in mixed]
    batched = {r["id"]: r["score"] for r in response["results"]}
    single = {item["id"]: scores(rm_url, [item])[item["id"]] for item in mixed}
    assert batched == pytest.approx(single, rel=1e-4, abs=1e-5)


def test_info_reports_the_model_id(rm_url: str, tiny_reward_model_dir: Path) -> None:
    info = httpx.get(f"{rm_url}/v1/info").json()
    assert info["model_id"] == "tiny-rm" and info["name"] == "reward_model"
    default = build_scorer("model.sequence_classifier", {"model_path": str(tiny_reward_model_dir)})
    assert default.info().model_id == tiny_reward_model_dir.name


def test_unusable_checkpoints_fail_at_load_not_per_request(
    tmp_path: Path, tiny_reward_model_dir: Path
) -> None:
    with pytest.raises(FileNotFoundError, match="no Hugging Face checkpoint"):
        build_scorer("model.sequence_classifier", {"model_path": str(tmp_path)}).load()

    no_template = tmp_path / "no-template"
    shutil.copytree(tiny_reward_model_dir, no_template)
    for path in no_template.glob("chat_template*"):
        path.unlink()
    tokenizer = AutoTokenizer.from_pretrained(no_template)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(no_template)
    with pytest.raises(ValueError, match="no chat template"):
        build_scorer("model.sequence_classifier", {"model_path": str(no_template)}).load()

    two_labels = tmp_path / "two-labels"
    config = AutoConfig.from_pretrained(tiny_reward_model_dir)
    config.num_labels = 2
    AutoModelForSequenceClassification.from_config(config).save_pretrained(two_labels)
    AutoTokenizer.from_pretrained(tiny_reward_model_dir).save_pretrained(two_labels)
    with pytest.raises(ValueError, match="2 labels"):
        build_scorer("model.sequence_classifier", {"model_path": str(two_labels)}).load()

    # A causal LM (even one configured with one label) has no score head: it would score at random.
    causal = tmp_path / "causal-lm"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_reward_model_dir)).save_pretrained(
        causal
    )
    AutoTokenizer.from_pretrained(tiny_reward_model_dir).save_pretrained(causal)
    with pytest.raises(ValueError, match="score.weight"):
        build_scorer("model.sequence_classifier", {"model_path": str(causal)}).load()
