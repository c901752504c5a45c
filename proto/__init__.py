"""Wire contracts shared by every gd2po service (and nothing else is shared).

Services import only from here: the pydantic models of the messages they exchange, the msgpack
codec, the Redis key names and the experiment configuration.
"""

from proto.codec import SchemaVersionError, decode, encode
from proto.keys import RedisKeys
from proto.messages import (
    ChatMessage,
    Completion,
    DeadLetter,
    OpenRLHFRequest,
    OpenRLHFResponse,
    PolicyAnnouncement,
    PromptRecord,
    RewardInfo,
    ScoredGroup,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
    WeightOffer,
    WeightRequest,
)
from proto.version import SCHEMA_VERSION

__all__ = [
    "SCHEMA_VERSION",
    "ChatMessage",
    "Completion",
    "DeadLetter",
    "OpenRLHFRequest",
    "OpenRLHFResponse",
    "PolicyAnnouncement",
    "PromptRecord",
    "RedisKeys",
    "RewardInfo",
    "SchemaVersionError",
    "ScoreItem",
    "ScoreRequest",
    "ScoreResponse",
    "ScoreResult",
    "ScoredGroup",
    "WeightOffer",
    "WeightRequest",
    "decode",
    "encode",
]
