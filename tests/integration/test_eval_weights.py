"""`gd2po eval api-bank --weights`: a run folder's newest published policy (or a model folder, or a PEFT
adapter folder merged into its base) is served by a vLLM process started for the evaluation, scored, and
the process is gone afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gd2po.evaluate import model_folder, servable

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_run_folder_means_its_newest_complete_published_weights(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    run = tmp_path / "run"
    for step in (2, 10, 9):
        shutil.copytree(tiny_model_dir, run / "weights" / f"step-{step}")
    (run / "weights" / "step-11").mkdir()  # being written: no config yet
    assert model_folder(run) == run / "weights" / "step-10"
    assert model_folder(tiny_model_dir) == tiny_model_dir
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        model_folder(tmp_path / "empty")


def test_eval_serves_the_weights_scores_every_level_and_stops_its_server(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "weights" / "step-3")
    output = tmp_path / "scores.jsonl"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "gd2po.cli", "eval", "api-bank", "--weights", str(run)),
            *("--limit", "1", "--max-tokens", "8", "--max-model-len", "2048", "--output", str(output)),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step-3" in result.stdout and "overall" in result.stdout
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 3 and all(row["correct"] in (0, 1) for row in rows)
    log = tmp_path / "eval-vllm.log"
    assert log.is_file()
    leftover = subprocess.run(["pgrep", "-f", f"api_server --model {run}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "the evaluation's vLLM server outlived it"


def test_url_and_weights_are_exclusive(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gd2po.cli", "eval", "api-bank"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 2 and "exactly one of --url and --weights" in result.stderr


def save_random_adapter(base: Path, folder: Path) -> None:
    """A LoRA adapter on ``base`` with random A and B (PEFT's default B = 0 would be a no-op to merge)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(folder)


def test_an_adapter_folder_is_served_merged_into_its_base(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    save_random_adapter(tiny_model_dir, adapter)
    assert model_folder(adapter) == adapter
    ids = torch.tensor([[1, 5, 9, 30, 7, 2]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        expected = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits
        with servable(adapter) as merged:
            assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
            served = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
            assert torch.allclose(served(input_ids=ids).logits, expected, atol=1e-5)
            plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
            assert not torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-3)
    assert not merged.exists()  # the temporary merged folder is gone after the evaluation
    with servable(tiny_model_dir) as folder:
        assert folder == tiny_model_dir


def test_a_run_that_published_adapters_means_its_newest_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    """``trainer.lora.serve: adapter`` publishes adapter folders: ``--weights RUN`` takes the newest."""
    run = tmp_path / "run"
    for step in (3, 12):
        save_random_adapter(tiny_model_dir, run / "weights" / f"step-{step}")
    (run / "weights" / "step-13").mkdir()  # being written
    assert model_folder(run) == run / "weights" / "step-12"
    config = json.loads((run / "weights" / "step-12" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "elsewhere")
    (run / "weights" / "step-12" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="base_model_name_or_path"):  # said before any work starts
        model_folder(run)


def test_an_adapter_whose_base_is_not_here_is_refused_naming_the_field(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    adapter = tmp_path / "adapter"
    save_random_adapter(tiny_model_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "elsewhere")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="base_model_name_or_path"):
        model_folder(adapter)
