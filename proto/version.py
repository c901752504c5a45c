"""Schema version of the wire contracts.

Bump the minor version for additive, backward-compatible changes (new optional fields); bump the
major version when an older reader would misread a message. Readers refuse unknown major versions.
"""

SCHEMA_VERSION = "2.0"  # 2.0: PolicyAnnouncement.sha256 → digest (BLAKE3)
SCHEMA_MAJOR = int(SCHEMA_VERSION.split(".")[0])
