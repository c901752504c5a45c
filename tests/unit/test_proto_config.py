"""Experiment configuration: YAML + environment overrides, errors that name the key."""

from pathlib import Path

import pytest

from proto.config import ConfigError, dump_config, load_config

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_every_shipped_config_is_valid() -> None:
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "configs/ has no experiment files"
    for path in configs:
        config = load_config(path)
        assert config.rewards, f"{path.name} defines no rewards"


@pytest.mark.parametrize("estimator", ["gd2po_hard", "gdpo", "grpo"])
def test_baseline_configs_differ_from_the_demo_only_in_estimator_and_run(estimator: str) -> None:
    demo = load_config(REPO / "configs" / "tool_calling_smollm2_cpu.yaml").model_dump(mode="json")
    name = estimator.replace("_", "-")
    variant = load_config(REPO / "configs" / f"tool_calling_{estimator}_smollm2_cpu.yaml").model_dump(
        mode="json"
    )
    # The variant's advantage section is its estimator alone (the demo's τ belongs to gd2po_snr).
    assert variant["trainer"].pop("advantage") == load_config(
        trainer={"advantage": {"estimator": estimator}}
    ).trainer.advantage.model_dump(mode="json")
    assert variant.pop("run") == {
        **demo.pop("run"),
        "name": f"tool-calling-{name}",
        "output_dir": f"runs/tool-calling-{name}",
    }
    demo["trainer"].pop("advantage")
    assert variant == demo


def test_extends_merges_mappings_and_replaces_lists(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "trainer: {lr: 2.0e-6, advantage: {tau: 0.5}}\nrewards:\n  - {name: a, url: 'http://127.0.0.1:1'}\n"
        "  - {name: b, url: 'http://127.0.0.1:2'}\n"
    )
    (tmp_path / "nested").mkdir()
    child = tmp_path / "nested" / "child.yaml"
    child.write_text(
        "extends: ../base.yaml\ntrainer: {advantage: {tau: 0.9}}\nrewards:\n  - {name: c, url: 'http://127.0.0.1:3'}\n"
    )
    config = load_config(child)
    assert (config.trainer.lr, config.trainer.advantage.tau) == (2e-6, 0.9)
    assert config.reward_names == ["c"]


def test_extends_errors_name_the_problem(tmp_path: Path) -> None:
    missing = _write(tmp_path, "extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="config file not found: .*nowhere.yaml"):
        load_config(missing)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="extends must be a file name"):
        load_config(_write(tmp_path, "extends: [a.yaml]\n"))


def test_yaml_values_are_loaded_and_typed(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "trainer:\n  lr: 2.0e-6\n  advantage: {estimator: gd2po_hard}\nrewards:\n"
        "  - {name: correctness, url: 'http://127.0.0.1:8101', weight: 2}\n"
        "  - {name: format, url: ['http://a:1', 'http://b:2']}\n",
    )
    config = load_config(path)
    assert config.trainer.lr == 2e-6
    assert config.trainer.advantage.estimator == "gd2po_hard"
    assert config.rewards[0].weight == 2.0
    assert config.rewards[1].urls == ["http://a:1", "http://b:2"]
    assert config.reward_names == ["correctness", "format"]


def test_environment_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "trainer:\n  lr: 2.0e-6\n  advantage: {tau: 0.5}\n")
    monkeypatch.setenv("GD2PO_TRAINER__LR", "3e-5")
    monkeypatch.setenv("GD2PO_REDIS__URL", "redis://127.0.0.1:7000/1")
    config = load_config(path)
    assert config.trainer.lr == 3e-5
    assert config.trainer.advantage.tau == 0.5  # untouched keys of the same section survive
    assert config.redis.url == "redis://127.0.0.1:7000/1"


def test_swapping_a_reward_endpoint_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GD2PO_REWARDS", '[{"name": "correctness", "url": "http://other:9000"}]')
    assert load_config().rewards[0].urls == ["http://other:9000"]


def test_secrets_come_from_the_environment_and_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GD2PO_AUTH__TOKEN", "s3cret-token")
    config = load_config()
    assert config.auth.token.get_secret_value() == "s3cret-token"
    assert "s3cret-token" not in dump_config(config)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("trainer:\n  lrr: 1.0\n", "trainer.lrr"),
        ("trainer:\n  lr: fast\n", "trainer.lr"),
        ("rollout:\n  group_size: 0\n", "rollout.group_size"),
        ("rewards:\n  - {name: a}\n", "rewards.0.url"),
        ("model:\n  dtype: float8\n", "model.dtype"),
        ("unknown_section: {}\n", "unknown_section"),
    ],
)
def test_wrong_key_or_type_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"(?m)^  {key}: "):
        load_config(_write(tmp_path, text))


def test_wrong_environment_key_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GD2PO_TRAINER__TAUU", "0.1")
    with pytest.raises(ConfigError, match="trainer.tauu"):
        load_config()


def test_duplicate_reward_names_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate reward names"):
        load_config(
            _write(tmp_path, "rewards:\n  - {name: a, url: 'http://x'}\n  - {name: a, url: 'http://y'}\n")
        )
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_placeholders_take_parameters_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "model:\n  path: ${POLICY_DIR:-/models/default}\nrun:\n  name: ${RUN_NAME}\n")
    monkeypatch.setenv("RUN_NAME", "exp-7")
    config = load_config(path)
    assert (str(config.model.path), config.run.name) == ("/models/default", "exp-7")
    monkeypatch.setenv("POLICY_DIR", "/models/other")
    assert str(load_config(path).model.path) == "/models/other"
    monkeypatch.delenv("RUN_NAME")
    with pytest.raises(ConfigError, match=r"\$\{RUN_NAME\} is not set"):
        load_config(path)


def test_synchronous_refuses_several_rollout_replicas(tmp_path: Path) -> None:
    """Replicas that each wait for the trainer generate at once: more groups than a step takes, the rest
    trained a version later — no longer the on-policy run synchronous promises."""
    assert load_config(_write(tmp_path, "rollout: {replicas: 2}\n")).rollout.replicas == 2
    with pytest.raises(ConfigError, match=r"synchronous: true needs rollout.replicas: 1, got 2"):
        load_config(_write(tmp_path, "synchronous: true\nrollout: {replicas: 2}\n"))


def test_a_synchronous_batch_must_fit_one_step(tmp_path: Path) -> None:
    """Synchronous: a batch larger than a step leaves groups a version behind; a smaller one is fine (the
    trainer asks for the groups it lacks at its version, with or without dynamic sampling)."""
    sync = "synchronous: true\n"
    with pytest.raises(ConfigError, match=r"prompts_per_batch \(8\) <= trainer.prompts_per_step \(4\)"):
        load_config(
            _write(tmp_path, sync + "rollout: {prompts_per_batch: 8}\ntrainer: {prompts_per_step: 4}\n")
        )
    smaller = load_config(
        _write(tmp_path, sync + "rollout: {prompts_per_batch: 2}\ntrainer: {prompts_per_step: 4}\n")
    )
    assert smaller.synchronous
    asks = "trainer: {prompts_per_step: 4, max_staleness: 0, dynamic_sampling: {oversample: 2}}\n"
    assert load_config(_write(tmp_path, sync + "rollout: {prompts_per_batch: 2}\n" + asks)).synchronous
    # Asynchronous runs keep any batch size (the backlog bound governs them).
    load_config(_write(tmp_path, "rollout: {prompts_per_batch: 8}\ntrainer: {prompts_per_step: 4}\n"))
