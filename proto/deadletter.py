"""Writing and reading the dead-letter stream: one record shape (:class:`proto.DeadLetter`) and one
way to write it, for every producer of dead letters.

A dead letter is written in the same MULTI/EXEC as whatever retires the group elsewhere (the trainer
acknowledges the stream entry, the rollout counts the group as produced), so a crash leaves the group
either still to handle or dead-lettered once — never lost, never both. Its group id, when known, joins
the ``dead`` ledger set beside ``trained`` and ``stale``.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Literal

import msgpack
import redis

from proto.codec import CodecError, decode, encode
from proto.keys import RedisKeys
from proto.messages import DeadLetter, ScoredGroup
from proto.stream import MESSAGE_FIELD, entry_fields, entry_message


def add_dead_letter(pipe: redis.client.Pipeline, keys: RedisKeys, letter: DeadLetter) -> None:
    """Queue the commands that dead-letter ``letter`` on ``pipe`` (the caller executes it)."""
    pipe.xadd(keys.deadletter, entry_fields(encode(letter)))
    if letter.group_id is not None:
        pipe.sadd(keys.dead, letter.group_id)


def untrainable(group: ScoredGroup, reason: str, *, source: str, entry_id: str | None = None) -> DeadLetter:
    """The whole of a decoded group that cannot be trained, with the reason."""
    return _whole_group("untrainable", group, reason, source=source, entry_id=entry_id)


def crashed_trainer(
    group: ScoredGroup, reason: str, *, source: str, entry_id: str | None = None
) -> DeadLetter:
    """The whole of a group that was in a step the trainer died in too many times, with the reason."""
    return _whole_group("crashed_trainer", group, reason, source=source, entry_id=entry_id)


def _whole_group(
    kind: Literal["untrainable", "crashed_trainer"],
    group: ScoredGroup,
    reason: str,
    *,
    source: str,
    entry_id: str | None,
) -> DeadLetter:
    return DeadLetter(
        kind=kind,
        reason=reason,
        source=source,
        dead_at=time.time(),
        entry_id=entry_id,
        **group.model_dump(
            include={
                "group_id",
                "prompt_id",
                "prompt_token_ids",
                "completions",
                "rewards",
                "policy_version",
                "producer_id",
                "created_at",
                "scored_at",
                "metadata",
            }
        ),
    )


def undecodable(
    fields: Mapping[bytes | str, bytes],
    reason: str,
    *,
    source: str,
    entry_id: str | None = None,
    dead_at: float | None = None,
) -> DeadLetter:
    """A stream entry whose message cannot be read as a ScoredGroup: its bytes in ``raw``, and the group
    id, prompt id, policy version and producer when the envelope is readable enough to name them (so
    the ``dead`` ledger accounts for the group and a second copy is recognised as a duplicate)."""
    data = entry_message(fields)
    if data is None:  # no message field: keep every field
        data = msgpack.packb(dict(fields), use_bin_type=True)
    return DeadLetter(
        kind="undecodable",
        reason=reason or "undecodable entry",
        source=source,
        dead_at=time.time() if dead_at is None else dead_at,
        entry_id=entry_id,
        raw=base64.b64encode(data).decode("ascii"),
        **_readable_identity(data),
    )


def raw_bytes(letter: DeadLetter) -> bytes | None:
    """The original bytes of an undecodable entry (None when the letter has none)."""
    return None if letter.raw is None else base64.b64decode(letter.raw, validate=True)


def read_dead_letters(client: redis.Redis, keys: RedisKeys) -> list[tuple[str, DeadLetter]]:
    """Every record of the dead-letter stream as (entry id, DeadLetter), oldest first.

    Records the trainer wrote before this shape existed (fields ``raw`` and ``reason``) are read as kind
    ``undecodable``, and so is any other entry that does not decode: none is skipped.
    """
    letters = []
    for entry_id, fields in client.xrange(keys.deadletter):
        entry = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        fields = {k.encode() if isinstance(k, str) else k: v for k, v in fields.items()}
        try:
            message = entry_message(fields)
            if message is None:
                raise KeyError(MESSAGE_FIELD)
            letter = decode(message, DeadLetter)
        except (KeyError, CodecError, ValueError) as exc:
            written = float(entry.split("-")[0]) / 1000  # a stream entry id starts with its unix ms
            if b"raw" in fields and b"reason" in fields:  # the trainer's record before schema 2.1
                reason = fields[b"reason"]
                reason = reason.decode(errors="replace") if isinstance(reason, bytes) else reason
                letter = undecodable(entry_fields(fields[b"raw"]), reason, source="trainer", dead_at=written)
            else:
                letter = undecodable(
                    fields, f"dead-letter record does not decode: {exc}", source="", dead_at=written
                )
        letters.append((entry, letter))
    return letters


def _readable_identity(data: bytes) -> dict:
    """Group id, prompt id, policy version and producer of a message that is an envelope with a body
    map, each only when it has the right type; nothing otherwise."""
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # any unreadable bytes simply name nothing
        return {}
    body = envelope.get("body") if isinstance(envelope, dict) else None
    if not isinstance(body, dict):
        return {}
    found = {}
    for name, kind in (("group_id", str), ("prompt_id", str), ("producer_id", str)):
        if isinstance(body.get(name), kind) and body[name]:
            found[name] = body[name][:256]
    version = body.get("policy_version")
    if isinstance(version, int) and not isinstance(version, bool) and 0 <= version < 2**63:
        found["policy_version"] = version
    return found
