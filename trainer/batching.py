"""ScoredGroups → padded training tensors.

Each rollout is ``prompt + response`` right-padded to the batch's longest sequence. Token tensors are
aligned to *targets* (position t holds the log-prob of token t+1), so the response mask, the rollout's
log-probs (π_old) and the advantages all share the shape [N, L−1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from proto import ScoredGroup


@dataclass
class TrainBatch:
    input_ids: Tensor  # [N, L] int64
    attention_mask: Tensor  # [N, L] int64
    response_mask: Tensor  # [N, L-1] float32, 1 on response targets
    old_logprobs: Tensor  # [N, L-1] float32, behaviour-policy log-probs on response targets
    rewards: Tensor  # [N, K] float64 in the order of `reward_names`
    group_index: Tensor  # [N] int64, rollout → its group's position in the batch
    staleness: Tensor  # [N] int64, policy versions between generation and this step

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: Tensor) -> TrainBatch:
        return TrainBatch(*(getattr(self, name)[rows] for name in self.__dataclass_fields__))

    def group_staleness(self) -> list[int]:
        """Staleness of each group, in group order: one value per group (its rows share it), which is
        what the staleness histogram observes: groups at versions 5 and 2 trained at 5 give [0, 3]."""
        if not self.size:
            return []
        groups = int(self.group_index.max()) + 1
        rows = torch.arange(self.size)
        first = torch.full((groups,), self.size).scatter_reduce_(0, self.group_index, rows, "amin")
        return self.staleness[first].tolist()


@dataclass(frozen=True)
class GroupRules:
    """What a decoded ScoredGroup must satisfy for this experiment and this model to train on it.

    The codec already refuses what no trainer could read (non-finite rewards or log-probs, misaligned
    lengths, a reward table that is not K×G, negative token ids). These rules add what depends on the
    experiment and the model: every configured reward is present (``build_batch`` needs each one), every
    token id has a row in the embedding and the LM head (else the forward fails with an index error),
    prompt + response fits the model's context (``max_position_embeddings``; the rollout never generates
    past it, so a longer group is not from this model), and some completion has a response token (a
    group of empty responses has nothing to train on, and a micro-batch of only such rows has no
    gradient to take a backward of; one empty completion beside others is a rollout like any other).
    The trainer checks them when it pulls
    a group: a group breaking one is dead-lettered with the reason, instead of failing every step that
    includes it — and, since its entry stays pending, every restart after.
    """

    reward_names: tuple[str, ...]
    vocab_size: int
    max_positions: int | None = None

    @classmethod
    def for_model(cls, reward_names: Sequence[str], model: torch.nn.Module) -> GroupRules:
        """Rules for a Hugging Face causal LM: the smaller of its input and output vocabularies (a token
        past either fails), and its context length when its config states one."""
        sizes = [model.get_input_embeddings().num_embeddings]
        head = model.get_output_embeddings()
        if head is not None and getattr(head, "out_features", None):
            sizes.append(head.out_features)
        positions = getattr(model.config, "max_position_embeddings", None)
        return cls(tuple(reward_names), min(sizes), int(positions) if positions else None)

    def violation(self, group: ScoredGroup) -> str | None:
        """Why ``group`` cannot be trained, or None when it can."""
        missing = [name for name in self.reward_names if name not in group.rewards]
        if missing:
            return (
                f"rewards lack {missing}: the experiment trains on {list(self.reward_names)}, "
                f"the group has {sorted(group.rewards)}"
            )
        for where, ids in (
            ("prompt_token_ids", group.prompt_token_ids),
            *((f"completions[{i}].token_ids", c.token_ids) for i, c in enumerate(group.completions)),
        ):
            if ids and max(ids) >= self.vocab_size:
                return (
                    f"{where} holds token id {max(ids)}, outside the model's vocabulary of {self.vocab_size}"
                )
        if not any(c.token_ids for c in group.completions):
            return "every completion is empty: no response token to train on"
        longest = len(group.prompt_token_ids) + max(len(c.token_ids) for c in group.completions)
        if self.max_positions is not None and longest > self.max_positions:
            return (
                f"prompt + response is {longest} tokens, longer than the model's context of "
                f"{self.max_positions} (max_position_embeddings)"
            )
        return None


def build_batch(
    groups: list[ScoredGroup], reward_names: list[str], current_version: int, pad_id: int
) -> TrainBatch:
    missing = [n for n in reward_names if any(n not in g.rewards for g in groups)]
    if missing:
        raise ValueError(f"groups lack rewards {missing}; the experiment expects {reward_names}")
    rows = [(g_index, g, c) for g_index, g in enumerate(groups) for c in g.completions]
    length = max(len(g.prompt_token_ids) + len(c.token_ids) for _, g, c in rows)
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    response = torch.zeros((n, length - 1), dtype=torch.float32)
    old = torch.zeros((n, length - 1), dtype=torch.float32)
    for row, (_, group, completion) in enumerate(rows):
        prompt, answer = group.prompt_token_ids, completion.token_ids
        total = len(prompt) + len(answer)
        input_ids[row, :total] = torch.tensor(prompt + answer)
        attention[row, :total] = 1
        start = len(prompt) - 1  # logits at prompt's last token predict the first response token
        response[row, start : start + len(answer)] = 1.0
        old[row, start : start + len(answer)] = torch.tensor(completion.logprobs, dtype=torch.float32)
    rewards = torch.tensor(
        [
            [group.rewards[name][i] for name in reward_names]
            for group in groups
            for i in range(group.group_size)
        ],
        dtype=torch.float64,
    )
    group_index = torch.tensor([g_index for g_index, _, _ in rows], dtype=torch.long)
    staleness = torch.tensor([current_version - g.policy_version for _, g, _ in rows], dtype=torch.long)
    return TrainBatch(input_ids, attention, response, old, rewards, group_index, staleness)
