"""Redis stream, key and channel names, in one place.

A namespace prefix lets several experiments share one Redis without seeing each other's data.
"""

from dataclasses import dataclass

TRAINER_CONSUMER_GROUP = "trainer"


@dataclass(frozen=True)
class RedisKeys:
    """All Redis names used by gd2po for one experiment namespace."""

    namespace: str = "gd2po"

    @property
    def groups(self) -> str:
        """Stream of msgpack ScoredGroups, rollout → trainer (consumer group ``trainer``)."""
        return f"{self.namespace}:groups"

    @property
    def deadletter(self) -> str:
        """Stream of DeadLetter records, one shape for every producer (see proto.deadletter): groups whose
        rewards failed after retries (rollout), groups that cannot be trained and entries that do not
        decode (trainer)."""
        return f"{self.namespace}:deadletter"

    @property
    def policy(self) -> str:
        """String key holding the current PolicyAnnouncement (msgpack)."""
        return f"{self.namespace}:policy"

    @property
    def weights_offer(self) -> str:
        """String key holding the newest WeightOffer (msgpack): weights served over a process group
        (``trainer.publish.transport: broadcast``); absent with the disk transport."""
        return f"{self.namespace}:weights_offer"

    @property
    def weights_requests(self) -> str:
        """List of WeightRequests (msgpack), rollout → trainer: a replica waiting to receive the offer."""
        return f"{self.namespace}:weights_requests"

    @property
    def events(self) -> str:
        """Pub/sub channel: a PolicyAnnouncement is published here on every new version."""
        return f"{self.namespace}:events"

    @property
    def trained(self) -> str:
        """Set of group ids already used by an optimizer step (trainer idempotence ledger)."""
        return f"{self.namespace}:trained"

    @property
    def stale(self) -> str:
        """Set of group ids dropped by the trainer as too stale."""
        return f"{self.namespace}:stale"

    @property
    def skipped(self) -> str:
        """Set of group ids read and not trained because they carry no signal (every reward equal within
        the group, or the estimator keeps none of it): ``trainer.dynamic_sampling``."""
        return f"{self.namespace}:skipped"

    @property
    def groups_wanted(self) -> str:
        """String ``<policy version>:<produced>:<groups wanted>``: a synchronous trainer under
        ``trainer.dynamic_sampling`` that has read every group and still lacks informative ones asks the
        rollout for another batch at that version (proto/stream.py, :func:`want_more_groups`)."""
        return f"{self.namespace}:groups_wanted"

    @property
    def dead(self) -> str:
        """Set of group ids that went to the dead-letter stream, whoever sent them (rollout or trainer)."""
        return f"{self.namespace}:dead"

    @property
    def in_step(self) -> str:
        """Set of the group ids the trainer is learning on: written before a step's update and deleted
        after it, so it is found set only when the trainer died mid-step (trainer.consumer)."""
        return f"{self.namespace}:in_step"

    @property
    def step_crashes(self) -> str:
        """Hash group id → how many steps holding it the trainer died in; the trainer dead-letters a group
        at ``trainer.max_crashes_per_group`` (kind ``crashed_trainer``) so it cannot crash every restart."""
        return f"{self.namespace}:step_crashes"

    @property
    def published(self) -> str:
        """Set of group ids a rollout added to the groups stream: each is added (and counted in
        ``produced``) once, even when a lost reply makes the rollout's Redis client send the call again."""
        return f"{self.namespace}:published"

    @property
    def produced(self) -> str:
        """Counter of groups produced; with the ledger sets it lets tests account for every group."""
        return f"{self.namespace}:produced"

    @property
    def prompt_cursor(self) -> str:
        """Counter: the next position of the shared prompt order (rollout_service.prompts). Every rollout
        replica claims a batch's positions with INCRBY, so replicas never take the same prompt within an
        epoch and a restarted one continues where the order is."""
        return f"{self.namespace}:prompt_cursor"

    @property
    def prompt_order(self) -> str:
        """String: the fingerprint of the prompt order the first rollout started with; a replica whose
        order differs (other files, seed or length limit) refuses to start."""
        return f"{self.namespace}:prompt_order"

    @property
    def trainer_group(self) -> str:
        """The trainer's consumer group on :attr:`groups` (created by proto.stream.ensure_consumer_group)."""
        return TRAINER_CONSUMER_GROUP
