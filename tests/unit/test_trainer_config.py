"""The nested trainer section: advantage settings as a union on the estimator, refused flat keys,
nested environment overrides, and the generated configuration reference."""

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gd2po import config_reference
from proto.config import (
    ADVANTAGE_VARIANTS,
    ESTIMATOR_NAMES,
    ConfigError,
    ExperimentConfig,
    dump_config,
    load_config,
)
from trainer.algorithms import ESTIMATORS, compute_advantages
from trainer.step import TRAINER_CONTROLLED

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "tool_calling_smollm2_cpu.yaml"


def _write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_union_has_one_variant_per_registered_estimator() -> None:
    assert sorted(ESTIMATOR_NAMES) == sorted(ESTIMATORS)


def test_every_variant_option_is_an_argument_of_compute_advantages() -> None:
    parameters = inspect.signature(compute_advantages).parameters
    for variant in ADVANTAGE_VARIANTS:
        options = set(variant.model_fields) - {"estimator"} - TRAINER_CONTROLLED
        assert options <= set(parameters), (variant.__name__, options - set(parameters))


@pytest.mark.parametrize(
    ("estimator", "option"),
    [
        ("grpo", "tau: 0.5"),
        ("grpo", "keep_rule: paper"),
        ("grpo", "reweight: false"),
        ("grpo", "filter: false"),
        ("grpo", "whiten: false"),  # GRPO never whitens
        ("gdpo", "tau: 0.5"),
        ("gdpo", "keep_rule: paper"),
        ("gdpo", "reweight: false"),
        ("gdpo", "filter: false"),
        ("gd2po_hard", "tau: 0.5"),
        ("gd2po_hard", "keep_rule: paper"),
        ("gd2po_snr", "taau: 0.5"),  # a typo
    ],
)
def test_an_option_the_estimator_does_not_read_fails_at_load(
    tmp_path: Path, estimator: str, option: str
) -> None:
    key = option.split(":")[0]
    path = _write(tmp_path, f"trainer:\n  advantage: {{estimator: {estimator}, {option}}}\n")
    with pytest.raises(
        ConfigError, match=rf"(?m)^  trainer\.advantage\.{key}: does not apply to estimator '{estimator}'"
    ):
        load_config(path)


def test_each_estimator_loads_with_its_own_options(tmp_path: Path) -> None:
    text = (
        "trainer:\n  advantage: {estimator: gd2po_snr, tau: 0.5, keep_rule: paper, reweight: false, "
        "filter: true, whiten: false, norm_by_std: false}\n"
    )
    advantage = load_config(_write(tmp_path, text)).trainer.advantage
    assert (advantage.estimator, advantage.tau, advantage.keep_rule, advantage.whiten) == (
        "gd2po_snr",
        0.5,
        "paper",
        False,
    )
    assert load_config(
        _write(tmp_path, "trainer: {advantage: {estimator: grpo, norm_by_std: false}}\n")
    ).trainer.advantage.model_dump() == {"estimator": "grpo", "norm_by_std": False}


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        (
            "trainer: {advantage: {estimator: gd2po}}\n",
            "trainer.advantage.estimator",
            "unknown estimator 'gd2po'; known: grpo",
        ),
        ("trainer: {advantage: {tau: 1.5}}\n", "trainer.advantage.tau", "less than or equal to 1"),
        ("trainer: {advantage: gdpo}\n", "trainer.advantage", "expected a mapping"),
        ("trainer: {loss: {dual_clip: 0.5}}\n", "trainer.loss.dual_clip", "greater than 1"),
        ("trainer: {publish: {keep_last: 0}}\n", "trainer.publish.keep_last", "greater than or equal to 1"),
        ("trainer: {checkpoint: {evry: 2}}\n", "trainer.checkpoint.evry", "Extra inputs"),
    ],
)
def test_advantage_and_sub_section_errors_name_the_dotted_key(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=rf"(?m)^  {key}: .*{message}"):
        load_config(_write(tmp_path, text))


# Written out here, not read from proto.config, so a wrong entry there fails.
OLD_KEYS = {
    "estimator": "trainer.advantage.estimator",
    "tau": "trainer.advantage.tau",
    "norm_by_std": "trainer.advantage.norm_by_std",
    "whiten": "trainer.advantage.whiten",
    "keep_rule": "trainer.advantage.keep_rule",
    "reweight": "trainer.advantage.reweight",
    "filter": "trainer.advantage.filter",
    "clip_low": "trainer.loss.clip_low",
    "clip_high": "trainer.loss.clip_high",
    "dual_clip": "trainer.loss.dual_clip",
    "loss_agg": "trainer.loss.agg",
    "kl_coef": "trainer.loss.kl_coef",
    "reference_path": "trainer.loss.reference_path",
    "entropy_coef": "trainer.loss.entropy_coef",
    "recompute_old_logprobs": "trainer.loss.recompute_old_logprobs",
    "publish_every": "trainer.publish.every",
    "background_publish": "trainer.publish.background",
    "save_every": "trainer.checkpoint.every",
    "keep_last": "trainer.checkpoint.keep_last",
}


@pytest.mark.parametrize(("old", "new"), OLD_KEYS.items())
def test_an_old_flat_key_is_refused_naming_its_new_place(tmp_path: Path, old: str, new: str) -> None:
    value = {
        "estimator": "gdpo",
        "loss_agg": "token-mean",
        "keep_rule": "paper",
        "dual_clip": "2",
        "reference_path": "ref",
    }.get(old, "1")
    with pytest.raises(ConfigError, match=rf"(?m)^  trainer\.{old}: moved to {new} \(environment: "):
        load_config(_write(tmp_path, f"trainer:\n  {old}: {value}\n"))
    # and the new place accepts it
    section, _, name = new.removeprefix("trainer.").partition(".")
    load_config(_write(tmp_path, f"trainer:\n  {section}: {{{name}: {value}}}\n"))


def test_keep_last_became_two_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trainer.publish.keep_last for published weights"):
        load_config(_write(tmp_path, "trainer: {keep_last: 2}\n"))
    trainer = load_config(
        _write(tmp_path, "trainer: {publish: {keep_last: 1}, checkpoint: {keep_last: 4}}\n")
    ).trainer
    assert (trainer.publish.keep_last, trainer.checkpoint.keep_last) == (1, 4)


def test_an_old_flat_key_from_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GD2PO_TRAINER__TAU", "0.9")
    with pytest.raises(
        ConfigError,
        match=r"trainer\.tau: moved to trainer\.advantage\.tau \(environment: GD2PO_TRAINER__ADVANTAGE__TAU\)",
    ):
        load_config(DEMO)


def test_nested_keys_are_overridden_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GD2PO_TRAINER__ADVANTAGE__TAU", "0.5")
    monkeypatch.setenv("GD2PO_TRAINER__LOSS__KL_COEF", "0.1")
    monkeypatch.setenv("GD2PO_TRAINER__CHECKPOINT__EVERY", "7")
    monkeypatch.setenv("GD2PO_TRAINER__LR", "3e-5")
    file = load_config(DEMO)
    assert (file.trainer.advantage.estimator, file.trainer.advantage.tau) == ("gd2po_snr", 0.5)
    assert (file.trainer.loss.kl_coef, file.trainer.checkpoint.every, file.trainer.lr) == (0.1, 7, 3e-5)
    # keys of the same sub-sections the environment did not name keep the file's values
    assert file.trainer.publish.every == 1 and file.trainer.total_steps > 1


def test_an_option_alone_in_the_environment_applies_to_the_default_estimator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GD2PO_TRAINER__ADVANTAGE__KEEP_RULE", "paper")
    advantage = load_config().trainer.advantage
    assert (advantage.estimator, advantage.keep_rule) == ("gd2po_snr", "paper")


def test_an_estimator_switched_from_the_environment_drops_the_files_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The demo sets tau: 0.8 (gd2po_snr's); GD2PO_TRAINER__ADVANTAGE__ESTIMATOR=grpo compares GRPO on
    the same file (README), so the switch starts the section afresh; tau named again still fails."""
    monkeypatch.setenv("GD2PO_TRAINER__ADVANTAGE__ESTIMATOR", "grpo")
    assert load_config(DEMO).trainer.advantage.model_dump() == {"estimator": "grpo", "norm_by_std": True}
    monkeypatch.setenv("GD2PO_TRAINER__ADVANTAGE__TAU", "0.5")
    with pytest.raises(ConfigError, match=r"trainer\.advantage\.tau: does not apply to estimator 'grpo'"):
        load_config(DEMO)


def test_extends_with_another_estimator_replaces_the_advantage_section(tmp_path: Path) -> None:
    _write(tmp_path, "trainer: {advantage: {estimator: gd2po_snr, tau: 0.5, whiten: false}}\n", "base.yaml")
    same = _write(tmp_path, "extends: base.yaml\ntrainer: {advantage: {keep_rule: paper}}\n", "same.yaml")
    assert load_config(same).trainer.advantage.model_dump() == {
        "estimator": "gd2po_snr",
        "norm_by_std": True,
        "whiten": False,
        "reweight": True,
        "filter": True,
        "tau": 0.5,
        "keep_rule": "paper",
        "adaptive_tau": None,
    }
    other = _write(tmp_path, "extends: base.yaml\ntrainer: {advantage: {estimator: gdpo}}\n", "other.yaml")
    assert load_config(other).trainer.advantage.model_dump() == {
        "estimator": "gdpo",
        "norm_by_std": True,
        "whiten": True,
    }
    wrong = _write(
        tmp_path, "extends: base.yaml\ntrainer: {advantage: {estimator: gdpo, tau: 0.3}}\n", "w.yaml"
    )
    with pytest.raises(ConfigError, match=r"trainer\.advantage\.tau: does not apply to estimator 'gdpo'"):
        load_config(wrong)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_a_dumped_config_loads_back_to_the_same_config(tmp_path: Path, name: str) -> None:
    """The run folder's config.yaml (dump_config) is rerun as is: the estimator tag must survive."""
    config = load_config(REPO / "configs" / name)
    again = load_config(_write(tmp_path, dump_config(config)))
    assert again == config


def test_the_trainer_passes_exactly_its_estimators_options() -> None:
    """advantages_for hands trainer.advantage to compute_advantages: a conflicting group whose rollouts
    τ = 0 keeps and τ = 1 drops gives different advantages, each equal to a direct call."""
    from trainer.step import advantages_for

    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # rollouts 0, 1 conflict
    batch = SimpleNamespace(
        rewards=rewards, group_index=torch.zeros(4, dtype=torch.long), response_mask=torch.ones(4, 3)
    )
    rewards_section = [{"name": "a", "url": "http://x"}, {"name": "b", "url": "http://x"}]
    results = []
    for tau in (0.0, 1.0):
        config = ExperimentConfig(
            rewards=rewards_section,
            trainer={"advantage": {"estimator": "gd2po_snr", "tau": tau, "whiten": False}},
        )
        estimate = advantages_for(batch, config)
        direct = compute_advantages(
            "gd2po_snr", rewards, batch.group_index, batch.response_mask, tau=tau, whiten=False
        )
        torch.testing.assert_close(estimate.advantages, direct.advantages)
        results.append(estimate.advantages)
    assert not torch.equal(*results)


def test_the_committed_config_reference_is_current() -> None:
    assert config_reference.PAGE.read_text() == config_reference.render(), (
        "docs/config.md is stale: run python -m gd2po.config_reference"
    )


def test_the_config_reference_documents_every_key() -> None:
    page = config_reference.render()
    for key in (
        "trainer.advantage",
        "trainer.loss",
        "trainer.publish",
        "trainer.checkpoint",
        "rewards[].launch",
    ):
        assert f"## `{key}`" in page
    for variant in ESTIMATOR_NAMES:
        assert f"with `estimator: {variant}`" in page
    # every key has its documentation: no empty description cell
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows), [
        line for line in rows if line.rstrip().endswith("|  |")
    ]


def test_lora_is_off_by_default_and_set_from_the_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_config(DEMO).trainer.lora is None  # full fine-tuning, as before the section existed
    lora = load_config(_write(tmp_path, "trainer:\n  lora: {r: 8, alpha: 16, target_modules: [q_proj]}\n"))
    assert lora.trainer.lora.model_dump() == {
        "r": 8,
        "alpha": 16.0,
        "dropout": 0.0,
        "target_modules": ["q_proj"],
        "serve": "merged",  # vLLM's LoRA generates ~4x slower on CPU (bench/RESULTS.md, "LoRA serving")
    }
    monkeypatch.setenv("GD2PO_TRAINER__LORA__R", "4")
    monkeypatch.setenv("GD2PO_TRAINER__LORA__TARGET_MODULES", "all-linear")
    monkeypatch.setenv("GD2PO_TRAINER__LORA__SERVE", "adapter")
    section = load_config(DEMO).trainer.lora
    assert (section.r, section.alpha, section.target_modules, section.serve) == (
        4,
        32.0,
        "all-linear",
        "adapter",
    )


def test_lora_with_zero_3_is_refused_naming_the_stages_that_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.lora is not supported with ZeRO-3 .*use stage 0, 1 or 2"):
        load_config(
            _write(tmp_path, "trainer:\n  lora: {r: 8}\n  deepspeed: {zero_optimization: {stage: 3}}\n")
        )
    with pytest.raises(ConfigError, match=r"trainer\.lora\.r"):
        load_config(_write(tmp_path, "trainer:\n  lora: {r: 0}\n"))


def test_adapters_vllm_cannot_serve_or_over_a_process_group_are_refused_naming_the_way_out(
    tmp_path: Path,
) -> None:
    with pytest.raises(
        ConfigError, match=r"r 600 is above 512, the largest rank vLLM serves; .*serve: merged"
    ):
        load_config(_write(tmp_path, "trainer:\n  lora: {r: 600, serve: adapter}\n"))
    assert load_config(_write(tmp_path, "trainer:\n  lora: {r: 600}\n")).trainer.lora.r == 600
    broadcast = "trainer:\n  publish: {transport: broadcast}\n  lora: {r: 8%s}\n"
    with pytest.raises(
        ConfigError, match=r"broadcast sends whole models; .*use transport: disk, or lora.serve: merged"
    ):
        load_config(_write(tmp_path, broadcast % ", serve: adapter"))
    assert load_config(_write(tmp_path, broadcast % "")).trainer.publish.transport == "broadcast"


def test_the_lora_ranks_gd2po_allows_are_the_ones_vllm_serves() -> None:
    """``MAX_SERVED_LORA_RANK`` (config) and the engine's rank list copy vLLM's ``MaxLoRARanks``; a vLLM
    upgrade that changes it must change them."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    from proto.config import MAX_SERVED_LORA_RANK
    from rollout_service.engine import VLLM_LORA_RANKS

    assert get_args(MaxLoRARanks) == VLLM_LORA_RANKS
    assert max(VLLM_LORA_RANKS) == MAX_SERVED_LORA_RANK
