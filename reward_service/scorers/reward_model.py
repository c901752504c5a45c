"""Reward-model scorer: any Hugging Face checkpoint that yields one scalar per sequence.

Serves the safety task's helpfulness reward model and harmlessness cost model: the conversation
(prompt + completion as the assistant turn) is rendered with the checkpoint's own chat template,
truncated, batched by length, and scored at the last token. ``negate`` flips the sign for cost models
where lower means better.
"""

from __future__ import annotations

import math
from pathlib import Path

from proto import ChatMessage, RewardInfo, ScoreItem
from reward_service.scorers.base import ItemScore, Scorer, register_scorer


def conversation(item: ScoreItem) -> list[dict[str, str]]:
    messages = (
        [{"role": "user", "content": item.prompt}]
        if isinstance(item.prompt, str)
        else [m.model_dump() for m in item.prompt if isinstance(m, ChatMessage)]
    )
    return [*messages, {"role": "assistant", "content": item.completion}]


@register_scorer("model.sequence_classifier")
class SequenceClassifier(Scorer):
    def __init__(
        self,
        model_path: str,
        name: str = "reward_model",
        max_length: int = 2048,
        batch_size: int = 8,
        device: str = "cpu",
        dtype: str = "float32",
        negate: bool = False,
        model_id: str | None = None,
    ):
        self.model_path = Path(model_path)
        self.name, self.max_length, self.batch_size = name, max_length, batch_size
        self.device, self.dtype, self.negate = device, dtype, negate
        self.model_id = model_id or self.model_path.name
        self.model = None
        self.tokenizer = None

    def load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not (self.model_path / "config.json").is_file():
            raise FileNotFoundError(f"no Hugging Face checkpoint at {self.model_path}")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            self.model_path, dtype=getattr(torch, self.dtype), output_loading_info=True
        )
        if loading["missing_keys"]:  # e.g. a plain causal LM: its score head would be random
            missing = sorted(loading["missing_keys"])
            raise ValueError(f"{self.model_path} has no trained weights for {missing}: not a reward model")
        if model.config.num_labels != 1:
            raise ValueError(
                f"{self.model_path} has {model.config.num_labels} labels; a reward model needs 1"
            )
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.model_path} has no chat template to render prompt + completion with")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model.config.pad_token_id = self.tokenizer.pad_token_id
        # Positions beyond what the model was built for give meaningless scores: truncate to its window.
        window = getattr(model.config, "max_position_embeddings", None)
        if window:
            self.max_length = min(self.max_length, window)
        self.model = model.to(self.device).eval()

    def info(self) -> RewardInfo:
        return RewardInfo(
            name=self.name,
            version=self.version,
            higher_is_better=True,
            description=f"sequence-classifier score{' (negated)' if self.negate else ''} of {self.model_id}",
            model_id=self.model_id,
        )

    def _encode(self, item: ScoreItem) -> list[int]:
        text = self.tokenizer.apply_chat_template(conversation(item), tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_length :]  # keep the end: the score is read at the last token

    def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        import torch

        results: list[ItemScore] = [ValueError("not scored")] * len(items)
        encoded: list[tuple[int, list[int]]] = []
        for index, item in enumerate(items):
            try:
                encoded.append((index, self._encode(item)))
            except Exception as exc:
                results[index] = exc
        encoded.sort(key=lambda pair: len(pair[1]))  # batch by length: little padding
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            width = max(len(ids) for _, ids in chunk)
            input_ids = torch.tensor(
                [ids + [pad] * (width - len(ids)) for _, ids in chunk], device=self.device
            )
            mask = torch.tensor(
                [[1] * len(ids) + [0] * (width - len(ids)) for _, ids in chunk], device=self.device
            )
            try:
                with torch.inference_mode():
                    output = self.model(input_ids=input_ids, attention_mask=mask)
                logits = output.logits[:, 0].float().tolist()
            except Exception as exc:  # e.g. out of memory: these items fail, the service keeps going
                for index, _ in chunk:
                    results[index] = exc
                continue
            for (index, _), value in zip(chunk, logits, strict=True):
                value = -value if self.negate else value
                results[index] = value if math.isfinite(value) else ValueError(f"non-finite score {value}")
        return results
