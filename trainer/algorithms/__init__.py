"""Advantage estimators for multi-reward group policy optimisation (GRPO, GDPO, GD²PO).

`compute_advantages(estimator, rewards, group_ids, response_mask, ...)` is the entry point; new
estimators are one function registered with `@register_estimator("name")` (see `estimators`).
"""

from trainer.algorithms.advantages import AdvantageEstimate, compute_advantages, informative_groups
from trainer.algorithms.batch import Batch
from trainer.algorithms.estimators import ESTIMATORS, Decision, register_estimator
from trainer.algorithms.whitening import masked_whiten

__all__ = [
    "ESTIMATORS",
    "AdvantageEstimate",
    "Batch",
    "Decision",
    "compute_advantages",
    "informative_groups",
    "masked_whiten",
    "register_estimator",
]
