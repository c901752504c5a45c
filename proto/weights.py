"""The digest that identifies a published weights folder (part of the PolicyAnnouncement contract).

The trainer computes it after writing a folder and the rollout service recomputes it before loading,
so a half-written or corrupted folder is refused instead of served. The digest is paid twice per policy
version on the critical path of training, so it is BLAKE3 over memory-mapped files, several times
cheaper than sha256 on a checkpoint (timings in bench/RESULTS.md, Pipeline).
"""

from pathlib import Path

import blake3

ALGORITHM = "blake3"

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""The two files of a PEFT adapter folder (what ``PeftModel.save_pretrained`` writes). A published folder
is either a whole model (``config.json`` + ``*.safetensors``) or such an adapter on the base model
(``trainer.lora.serve: adapter``)."""


def is_adapter_folder(folder: str | Path) -> bool:
    """``folder`` holds a PEFT adapter in safetensors (:data:`ADAPTER_CONFIG` + :data:`ADAPTER_WEIGHTS`)."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()


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
