"""Schema version of the wire contracts.

Bump the minor version for additive, backward-compatible changes (new optional fields); bump the
major version when an older reader would misread a message. Readers refuse unknown major versions.
"""

# 2.0: PolicyAnnouncement.sha256 → digest (BLAKE3). 2.1: one DeadLetter for every producer (kind, source,
# raw bytes of undecodable entries; group fields optional; partial_rewards read as rewards). 2.2: DeadLetter
# kind crashed_trainer — a new value, not a new field: a 2.1 reader's read_dead_letters reads such a record
# as undecodable (bytes kept), so nothing is lost, and a major bump would have made 2.1 readers refuse all.
SCHEMA_VERSION = "2.2"
SCHEMA_MAJOR = int(SCHEMA_VERSION.split(".")[0])
