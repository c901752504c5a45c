"""ScoredGroups → padded training tensors.

Each rollout is ``prompt + response`` right-padded to the batch's longest sequence. Token tensors are
aligned to *targets* (position t holds the log-prob of token t+1), so the response mask, the rollout's
log-probs (π_old) and the advantages all share the shape [N, L−1].
"""

from __future__ import annotations

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
