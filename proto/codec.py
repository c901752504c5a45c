"""msgpack codec with a schema-version envelope: ``{"v": "2.2", "type": "ScoredGroup", "body": {...}}``.

Only msgpack (never pickle) crosses the wire. A reader refuses a message whose major version it does
not know, with an error that says which versions are involved, instead of misreading it.
"""

from typing import TypeVar

import msgpack
from pydantic import BaseModel

from proto.version import SCHEMA_MAJOR, SCHEMA_VERSION

M = TypeVar("M", bound=BaseModel)


class CodecError(ValueError):
    """The bytes are not a gd2po message of the expected type."""


class SchemaVersionError(CodecError):
    """The message was written with a schema major version this reader does not support."""


def encode(message: BaseModel) -> bytes:
    """Serialise a proto model into a versioned msgpack envelope."""
    envelope = {"v": SCHEMA_VERSION, "type": type(message).__name__, "body": message.model_dump(mode="json")}
    try:
        return msgpack.packb(envelope, use_bin_type=True)
    except (OverflowError, TypeError) as exc:
        raise CodecError(f"{type(message).__name__} cannot be encoded as msgpack: {exc}") from exc


def decode(data: bytes, model: type[M]) -> M:
    """Parse and validate an envelope as ``model``; refuse unknown major versions and wrong types."""
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (msgpack.UnpackException, ValueError) as exc:
        raise CodecError(f"not a msgpack message: {exc}") from exc
    if not isinstance(envelope, dict) or not {"v", "type", "body"} <= envelope.keys():
        raise CodecError("not a gd2po envelope: expected a map with keys 'v', 'type', 'body'")
    version = str(envelope["v"])
    major = version.split(".")[0]
    if not major.isdigit() or int(major) != SCHEMA_MAJOR:
        raise SchemaVersionError(
            f"message schema version {version!r} is not supported by this reader "
            f"(it reads major version {SCHEMA_MAJOR}, schema {SCHEMA_VERSION}); upgrade the reader"
        )
    if envelope["type"] != model.__name__:
        raise CodecError(f"expected a {model.__name__} message, got {envelope['type']!r}")
    return model.model_validate(envelope["body"])
