"""LoRA training for real (``trainer.lora``): DeepSpeed (ZeRO-0 and ZeRO-2, CPU/gloo) on a tiny model, fed
the model's own generations through a real Redis. The optimizer holds the adapters only and checkpoints
are adapter-sized next to a full run's; the published folder is the adapter alone, which vLLM-CPU's LoRA
support serves on the base model as the trainer scores (``serve: adapter``), or the merged policy under
the base model's names, which reproduces the trainer's log-probs (``serve: merged``, the default); the
checkpoint's adapter loads with
``peft.PeftModel.from_pretrained`` and scores the same; resuming restores the adapters and their
optimizer state and trains on. (ZeRO-3 is refused at load: tests/unit/test_trainer_config.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_trainer_service import experiment as service_experiment
from test_trainer_service import served_logprobs  # the same vLLM-CPU scoring
from trainer_data import generate_groups, push
from transformers import AutoModelForCausalLM

from gd2po.runlog import read_steps
from proto.config import ExperimentConfig, LoraConfig
from proto.weights import weights_digest
from trainer import checkpoint
from trainer.engine import PolicyEngine, response_logprobs
from trainer.lora import ADAPTER_FOLDER, LoraSetupError, adapted_layers, attach
from trainer.service import Trainer

pytestmark = pytest.mark.integration
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions")
)
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}


def experiment(
    tmp_path: Path, model_dir: Path, redis_url: str, stage: int, lora: dict | None, **trainer
) -> ExperimentConfig:
    """test_trainer_service's experiment, checkpointing every step, with ``trainer.lora`` set."""
    options = {"lr": 1e-2, "checkpoint": {"every": 1, "keep_last": 5}, "lora": lora, **trainer}
    return service_experiment(tmp_path, model_dir, redis_url, stage, **options)


def optimizer_state_numel(engine: PolicyEngine) -> int:
    """Elements of every optimizer-state tensor (Adam's moments; ZeRO's flat partitions included)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sum(t.numel() for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())


def optimizer_param_numel(engine: PolicyEngine) -> int:
    """Elements the optimizer updates (ZeRO-1/2: its flat fp32 partitions; one rank holds them all)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sum(p.numel() for group in inner.param_groups for p in group["params"])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def logprobs_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """log π(token t+1 | ≤ t) over the whole sequence, [1, L−1], through the trainer's own code."""
    with torch.no_grad():
        values, _ = response_logprobs(model, ids, torch.ones_like(ids), torch.ones_like(ids[:, 1:]))
    return values


@pytest.mark.parametrize("stage", [0, 2])
def test_lora_publishes_merged_weights_and_saves_adapter_sized_checkpoints(
    stage: int, tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    groups = generate_groups(tiny_model_dir, 4, seed=11 + stage)
    push(redis_url, groups)
    merged = {**LORA, "serve": "merged"}
    lora_run = Trainer(experiment(tmp_path / "lora", tiny_model_dir, redis_url, stage, merged))
    state = lora_run.run()
    assert (state.step, state.policy_version, state.groups_trained) == (2, 2, 4)
    steps = read_steps(tmp_path / "lora" / "run")
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    engine = lora_run.engine
    module = engine.module.eval()

    # The optimizer holds the adapters only: Adam's two moments per adapter parameter.
    adapters = trainable(module)
    assert adapters and all(".lora_" in name for name in adapters)
    adapter_numel = sum(t.numel() for t in adapters.values())
    assert optimizer_param_numel(engine) == adapter_numel  # Adam's state is lazy: check what it updates
    assert optimizer_state_numel(engine) == 2 * adapter_numel

    # Published: the merged policy under the base model's names, not the base, reproducing the trainer.
    base = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    folder = tmp_path / "lora" / "run" / "weights" / "step-2"
    published = load_file(str(folder / "model.safetensors"))
    assert published.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], published[k])}
    assert changed and all(
        k.endswith(("q_proj.weight", "v_proj.weight", "up_proj.weight", "down_proj.weight")) for k in changed
    )
    sequence = groups[0].prompt_token_ids + groups[0].completions[0].token_ids
    ids = torch.tensor([sequence])
    expected = logprobs_of(module, ids)
    served = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert torch.allclose(logprobs_of(served, ids), expected, atol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert not torch.allclose(logprobs_of(plain, ids), expected, atol=1e-3)  # the adapters matter
    if stage == 2:  # vLLM-CPU serves the merged policy (separate process: its own runtime)
        vllm_logprobs = served_logprobs(folder, sequence)
        assert torch.allclose(vllm_logprobs, expected[0], atol=2e-3)

    # The checkpoint's adapter in PEFT format: loads on the base and scores as the trainer does.
    tag = tmp_path / "lora" / "run" / "checkpoints" / "step-2"
    adapter = tag / ADAPTER_FOLDER
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), adapter
    ).eval()
    assert torch.allclose(logprobs_of(loaded, ids), expected, atol=1e-5)

    # A full run on the same rollouts (new ids: the ledger has the first ones as trained): its optimizer
    # state and checkpoint are the whole model's.
    push(redis_url, [g.model_copy(update={"group_id": f"{g.group_id}-full"}) for g in groups])
    full_run = Trainer(experiment(tmp_path / "full", tiny_model_dir, redis_url, stage, None))
    full_run.run()
    model_numel = sum(p.numel() for p in full_run.engine.module.parameters())
    assert optimizer_param_numel(full_run.engine) == model_numel
    assert optimizer_state_numel(full_run.engine) == 2 * model_numel
    assert adapter_numel < model_numel / 50
    full_tag = tmp_path / "full" / "run" / "checkpoints" / "step-2"
    lora_bytes, full_bytes = folder_bytes(tag), folder_bytes(full_tag)
    # fp32 weights + two moments (+ ZeRO's fp32 partition) of every parameter vs of the adapters only.
    assert lora_bytes < full_bytes / 20, (lora_bytes, full_bytes)
    assert lora_bytes < 20 * adapter_numel * 4 + 200_000, lora_bytes  # a few adapter copies + metadata


VLLM_ADAPTER_LOGPROBS = """
import json, sys
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from proto.config import ModelConfig
from rollout_service.engine import Engine, Sampling
base, rank, ids = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
engine = Engine(ModelConfig(path=base, max_prompt_tokens=200, max_response_tokens=8), lora_rank=rank)
try:
    engine.reload(base)
except ValueError as exc:
    print("REFUSED=" + json.dumps(str(exc)))
for folder in sys.argv[4:]:
    try:
        engine.reload(folder)
    except Exception as exc:  # a broken folder: the previous adapter must still be served
        print("BROKEN=" + json.dumps(type(exc).__name__))
    out = engine.llm.generate(
        [TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0),
        use_tqdm=False, lora_request=engine.adapter,
    )
    print("LOGPROBS=" + json.dumps([d[t].logprob for d, t in zip(out[0].prompt_logprobs[1:], ids[1:])]))
# The rollouts' own path: Engine.generate applies the current adapter (greedy: temperature-1 log-probs).
(sample,) = engine.generate([ids], Sampling(n=1, temperature=0.0, top_p=1.0, max_tokens=4))[0]
print("GENERATED=" + json.dumps({"token_ids": sample.token_ids, "logprobs": sample.logprobs}))
"""


def vllm_adapter_logprobs(
    base: Path, rank: int, sequence: list[int], adapters: list[Path]
) -> tuple[dict[str, str], list[torch.Tensor], dict]:
    """The rollout's own ``Engine`` (vLLM-CPU with LoRA, its own process) on ``base``: what it printed
    refusing a whole-model folder (``REFUSED``) and a broken adapter (``BROKEN``); after each reload its
    log-prob of every token of ``sequence`` after the first; and a greedy ``Engine.generate`` of 4 tokens
    after ``sequence`` through the adapter served last (token ids and their log-probs)."""
    result = subprocess.run(
        [sys.executable, "-c", VLLM_ADAPTER_LOGPROBS, str(base), str(rank), json.dumps(sequence)]
        + [str(a) for a in adapters],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines = result.stdout.splitlines()
    said = {
        key: json.loads(x.removeprefix(f"{key}="))
        for x in lines
        for key in ("REFUSED", "BROKEN")
        if x.startswith(f"{key}=")
    }
    logprobs = [
        torch.tensor(json.loads(x.removeprefix("LOGPROBS="))) for x in lines if x.startswith("LOGPROBS=")
    ]
    generated = [json.loads(x.removeprefix("GENERATED=")) for x in lines if x.startswith("GENERATED=")]
    assert len(logprobs) == len(adapters) and generated, result.stdout[-2000:] + result.stderr[-3000:]
    return said, logprobs, generated[0]


def test_lora_publishes_the_adapter_alone_and_vllm_serves_it_as_the_trainer_scores(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    """``trainer.lora.serve: adapter``: every published version is the adapter in PEFT
    format, a few KB here, and the rollout's engine, started on the base model with vLLM's LoRA support,
    serves each newly loaded adapter as the trainer scores it."""
    groups = generate_groups(tiny_model_dir, 4, seed=31)
    push(redis_url, groups)
    run = Trainer(experiment(tmp_path, tiny_model_dir, redis_url, 2, {**LORA, "serve": "adapter"}))
    assert run.run().policy_version == 2
    module = run.engine.module.eval()
    weights = tmp_path / "run" / "weights"
    published = [weights / "step-1", weights / "step-2"]
    adapter_numel = sum(t.numel() for t in trainable(module).values())
    for folder in published:
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        assert weights_digest(folder).startswith(
            "blake3:"
        )  # what the announcement carries and the rollout checks
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        assert sum(t.numel() for t in tensors.values()) == adapter_numel
        assert folder_bytes(folder) < 4 * adapter_numel + 20_000
    assert json.loads((published[1] / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir.resolve()
    )

    sequence = groups[0].prompt_token_ids + groups[0].completions[0].token_ids
    ids = torch.tensor([sequence])
    expected = logprobs_of(module, ids)[0]
    first = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), published[0]
    ).eval()
    expected_first = logprobs_of(first, ids)[0]
    assert not torch.allclose(expected_first, expected, atol=1e-3)  # the two versions differ
    # A broken adapter (its tensors cut short, as a half-copied folder): refused, the newest good one kept.
    broken = tmp_path / "broken-adapter"
    shutil.copytree(published[1], broken)
    (broken / "adapter_model.safetensors").write_bytes(
        (published[1] / "adapter_model.safetensors").read_bytes()[:1000]
    )
    said, (served_first, served_last, served_after_broken), generated = vllm_adapter_logprobs(
        tiny_model_dir, LORA["r"], sequence, [*published, broken]
    )
    assert "a whole model" in said["REFUSED"] and "trainer.lora.serve" in said["REFUSED"]
    assert "BROKEN" in said
    assert torch.allclose(served_first, expected_first, atol=2e-3), (
        (served_first - expected_first).abs().max()
    )
    assert torch.allclose(served_last, expected, atol=2e-3), (served_last - expected).abs().max()
    assert torch.equal(served_after_broken, served_last)
    # Engine.generate (what rollouts and the OpenAI routes call) goes through the adapter too.
    continued = torch.tensor([sequence + generated["token_ids"]])
    trainer_scores = logprobs_of(module, continued)[0, len(sequence) - 1 :]
    assert torch.allclose(torch.tensor(generated["logprobs"]), trainer_scores, atol=2e-3), (
        generated,
        trainer_scores,
    )


def test_resume_from_a_lora_checkpoint_restores_the_adapters_and_their_optimizer_state(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    groups = generate_groups(tiny_model_dir, 6, seed=21)
    push(redis_url, groups[:4])
    config = experiment(tmp_path, tiny_model_dir, redis_url, 2, LORA)
    first = Trainer(config)
    first.run()
    saved = trainable(first.engine.module)
    saved_moments = optimizer_state_numel(first.engine)

    # Restored into a fresh engine: the adapters (the base comes from model.path) and Adam's state.
    fresh = PolicyEngine(config)
    assert any(not torch.equal(fresh_p, saved[n]) for n, fresh_p in trainable(fresh.module).items())
    state = checkpoint.load_latest(fresh, tmp_path / "run" / "checkpoints")
    assert state is not None and state.step == 2
    assert all(torch.equal(p, saved[n]) for n, p in trainable(fresh.module).items())
    ours = getattr(first.engine.optimizer, "optimizer", first.engine.optimizer).state
    theirs = getattr(fresh.optimizer, "optimizer", fresh.optimizer).state
    assert optimizer_state_numel(fresh) == saved_moments
    for a, b in zip(ours.values(), theirs.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    frozen = {n: p for n, p in fresh.module.named_parameters() if not p.requires_grad}
    base = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    for name, parameter in frozen.items():
        original = name.replace(".base_layer.", ".")
        if original in base:
            assert torch.equal(parameter, base[original]), name

    # And the trainer resumes from it, trains the next step and checkpoints it.
    push(redis_url, groups[4:])
    resumed = Trainer(
        config.model_copy(update={"trainer": config.trainer.model_copy(update={"total_steps": 3})}),
        resume=True,
    )
    state = resumed.run()
    assert state.step == 3 and state.groups_trained == 6
    assert [s["step"] for s in read_steps(tmp_path / "run")] == [1, 2, 3]
    assert (
        tmp_path / "run" / "checkpoints" / "step-3" / ADAPTER_FOLDER / "adapter_model.safetensors"
    ).is_file()
    assert adapted_layers(resumed.engine.module)


def test_targets_that_match_nothing_or_a_tied_weight_are_refused_naming_the_setting(
    tiny_model_dir: Path,
) -> None:
    def fresh() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    with pytest.raises(LoraSetupError, match=r"trainer\.lora\.target_modules: .*not_a_module"):
        attach(fresh(), LoraConfig(target_modules=["not_a_module"]), tiny_model_dir)
    # The tiny model ties its LM head to the embedding: merging into one name would leave the other stale.
    with pytest.raises(LoraSetupError, match=r"embed_tokens shares its weight .*lm_head\.weight"):
        attach(fresh(), LoraConfig(target_modules=["embed_tokens"]), tiny_model_dir)
