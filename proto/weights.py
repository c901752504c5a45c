"""The digest that identifies a published weights folder (part of the PolicyAnnouncement contract).

The trainer computes it after writing a folder and the rollout service recomputes it before loading,
so a half-written or corrupted folder is refused instead of served. The digest is paid twice per policy
version on the critical path of training, so it is BLAKE3 over memory-mapped files, several times
cheaper than sha256 on a checkpoint (timings in bench/RESULTS.md, Pipeline).
"""

from pathlib import Path

import blake3

ALGORITHM = "blake3"


def weights_digest(folder: str | Path) -> str:
    """``blake3:<hex>`` over the names and bytes of every ``*.safetensors`` file, in sorted order."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for path in files:
        digest.update(path.name.encode())
        digest.update_mmap(path)
    return f"{ALGORITHM}:{digest.hexdigest()}"
