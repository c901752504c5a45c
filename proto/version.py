"""Schema version of the wire contracts.

Bump the minor version for additive, backward-compatible changes (new optional fields); bump the
major version when an older reader would misread a message. Readers refuse unknown major versions.
"""

# 2.0: PolicyAnnouncement.sha256 → digest (BLAKE3). 2.1: one DeadLetter for every producer (kind, source,
# raw bytes of undecodable entries; group fields optional; partial_rewards read as rewards). 2.2: DeadLetter
# kind crashed_trainer; WeightRequest backends and receivers (optional, with defaults).
SCHEMA_VERSION = "2.2"
SCHEMA_MAJOR = int(SCHEMA_VERSION.split(".")[0])
