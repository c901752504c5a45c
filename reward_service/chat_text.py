"""The response text a reward scores, cut out of text that still carries chat-template markers.

Two sources of such text:

- ``/v1/score`` completions decoded without skipping special tokens. The GD²PO release scores the
  text after the **last** assistant-turn marker, cut at the **first** end-of-turn marker after it,
  stripped of whitespace (``compute_score`` in the release's
  ``tool-calling/verl/utils/reward_score/rlla.py``; ChatML markers for Qwen, Llama-3 markers for
  Llama). :func:`release_response` applies both families; on text without a family's markers that
  family's cut is the identity, so plain completions only lose surrounding whitespace.
- OpenRLHF remote-RM queries: prompt + response decoded with special tokens, possibly left-padded.
  :func:`openrlhf_response` removes the padding and the prompt, then applies the same cut, so the
  remote route never scores prompt text.
"""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError

from proto import OpenRLHFRequest, ScoreItem

# (assistant-turn marker, end-of-turn marker) per chat template the release handles.
CHAT_TURNS: tuple[tuple[str, str], ...] = (
    ("<|im_start|>assistant", "<|im_end|>"),  # ChatML: Qwen, SmolLM2
    ("<|start_header_id|>assistant<|end_header_id|>", "<|eot_id|>"),  # Llama 3
)
# Pad / end-of-sequence tokens a batch decode with special tokens leaves around a sequence.
PADDING_MARKERS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|pad|>",
    "<pad>",
    "</s>",
    "<s>",
)


class PromptNotFound(ValueError):
    """An OpenRLHF query whose prompt cannot be told apart from its response (client error, 422)."""


def release_response(text: str) -> str:
    """The release's scored text: after the last assistant-turn marker, before the first end-of-turn
    marker that follows, stripped (rlla.py ``compute_score``). str → str; never raises."""
    for assistant, end in CHAT_TURNS:
        text = text.rsplit(assistant, 1)[-1].split(end, 1)[0]
    return text.strip()


def _without_padding(text: str, *, leading: bool) -> str:
    """``text`` without any run of :data:`PADDING_MARKERS` (and whitespace) at one end."""
    while True:
        trimmed = text.lstrip() if leading else text.rstrip()
        for marker in PADDING_MARKERS:
            if leading and trimmed.startswith(marker):
                trimmed = trimmed[len(marker) :]
            elif not leading and trimmed.endswith(marker):
                trimmed = trimmed[: -len(marker)]
        if trimmed == text:
            return text
        text = trimmed


def openrlhf_response(query: str, prompt: str | None) -> str:
    """The response inside an OpenRLHF ``query`` (prompt + response, as OpenRLHF decodes it).

    Leading padding markers are dropped from ``query`` and ``prompt``; the prompt must then start the
    query, and the rest is cut with :func:`release_response` and loses trailing padding. Without a
    prompt the query must carry an assistant-turn marker (the cut then drops the prompt).

    Raises :class:`PromptNotFound` when the prompt is not at the start of the query, or when there is
    no prompt and no assistant-turn marker: scoring would include prompt text.
    """
    body = _without_padding(query, leading=True)
    if prompt is not None:
        head = _without_padding(prompt, leading=True)
        if not body.startswith(head):
            raise PromptNotFound("the query does not start with its prompt (after leading padding)")
        body = body[len(head) :]
    elif not any(assistant in body for assistant, _ in CHAT_TURNS):
        raise PromptNotFound(
            "without prompts the query needs a chat template's assistant marker "
            f"({', '.join(a for a, _ in CHAT_TURNS)}) to tell the response from the prompt; send prompts"
        )
    return _without_padding(release_response(body), leading=False)


def openrlhf_items(request: OpenRLHFRequest) -> list[ScoreItem]:
    """One :class:`ScoreItem` per query (id = its index) whose completion is the response alone.

    Raises :class:`RequestValidationError` (HTTP 422) listing every query whose prompt cannot be
    located, at ``["body", "prompts", i]`` (or ``["body", "query", i]`` when no prompts were sent).
    """
    count = len(request.query)
    prompts: list[str | None] = list(request.prompts) if request.prompts is not None else [None] * count
    labels = request.labels or [None] * count
    items, errors = [], []
    for index, (query, prompt, label) in enumerate(zip(request.query, prompts, labels, strict=True)):
        try:
            response = openrlhf_response(query, prompt)
        except PromptNotFound as exc:
            field = "query" if prompt is None else "prompts"
            errors.append(
                {"type": "value_error", "loc": ["body", field, index], "msg": str(exc), "input": None}
            )
            continue
        shown_prompt = "" if prompt is None else _without_padding(prompt, leading=True)
        items.append(ScoreItem(id=str(index), prompt=shown_prompt, completion=response, label=label))
    if errors:
        raise RequestValidationError(errors)
    return items
