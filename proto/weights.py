"""The digest that identifies a published weights folder (part of the PolicyAnnouncement contract).

The trainer computes it after writing a folder and the rollout service recomputes it before loading,
so a half-written or corrupted folder is refused instead of served.
"""

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def weights_digest(folder: str | Path) -> str:
    """sha256 over the names and bytes of every ``*.safetensors`` file, in sorted order."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
