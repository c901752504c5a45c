"""The SFT cold start (trainer.sft): trains with the DeepSpeed engine on answer tokens only, saves a model
transformers loads, and is cached by a key of base weights, data and settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from proto.config import load_config
from trainer.sft import INFO_FILE, cache_key, output_dir, run_sft

REPO_ROOT = Path(__file__).resolve().parents[2]
SFT_DATA = REPO_ROOT / "data" / "tool_calling" / "rlla_split" / "sft.parquet"


def sft_config(tmp_path: Path, model_dir: Path, **sft: object):
    settings = {
        "train_files": [SFT_DATA],
        "max_examples": 4,
        "epochs": 2,
        "batch_size": 2,
        "lr": 1e-3,
        "max_tokens": 2048,
        "output_root": tmp_path / "models",
        **sft,
    }
    return load_config(
        None, model={"path": model_dir, "max_prompt_tokens": 2000, "max_response_tokens": 48}, sft=settings
    )


def test_sft_lowers_the_answer_loss_saves_a_loadable_model_and_caches_it(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    config = sft_config(tmp_path, tiny_model_dir)
    folder, cached = run_sft(config)
    assert not cached and folder == output_dir(config)
    assert folder.name == f"{tiny_model_dir.name}-sft-{cache_key(config)}"
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["examples"]["used"] == 4 and info["optimizer_steps"] == 4
    losses = info["loss_per_step"]
    assert losses[-1] < losses[0], losses  # the same 4 answers seen twice at a high learning rate
    tuned = AutoModelForCausalLM.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(tuned.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert (folder / "tokenizer_config.json").is_file()

    # Same base, data and settings: the cache answers; another setting trains a model beside it.
    assert run_sft(config) == (folder, True)
    other = sft_config(tmp_path, tiny_model_dir, lr=5e-4)
    assert output_dir(other) != folder


def test_examples_longer_than_max_tokens_are_left_out_never_cut(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from trainer.sft import load_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = sft_config(tmp_path, tiny_model_dir, max_examples=None, max_tokens=700)
    examples, counts = load_examples(config, tokenizer)
    assert counts["rows"] == 151 and counts["used"] + counts["too_long"] == 151
    assert 0 < counts["too_long"] < 151
    for example in examples:
        rendered = tokenizer.apply_chat_template([*example["prompt"], *example["completion"]], tokenize=False)
        assert len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) <= 700


def test_the_command_line_names_a_config_without_an_sft_section(tmp_path: Path) -> None:
    config = tmp_path / "plain.yaml"
    config.write_text("run: {name: x}\n")
    result = subprocess.run(
        [sys.executable, "-m", "trainer.sft", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no sft section" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(autouse=True)
def _offline_extensions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
