"""`gd2po sweep`'s plan: the cross product of --vary values, one config file per arm × seed that loads,
the estimator swapped together with its options, and every bad arm reported before any run starts."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gd2po.cli import app
from gd2po.sweep import SweepError, grid, parse_vary, plan
from proto.config import load_config

SHOWCASE = Path(__file__).resolve().parents[2] / "configs" / "conflict_showcase_smollm2_cpu.yaml"


def test_values_are_read_as_yaml_and_exponents_as_numbers() -> None:
    assert parse_vary(["trainer.lr=1e-6,2.5e-6", "trainer.advantage.filter=true,false", "run.name=a"]) == [
        ("trainer.lr", [1e-6, 2.5e-6]),
        ("trainer.advantage.filter", [True, False]),
        ("run.name", ["a"]),
    ]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["trainer.lr"], "expected KEY=VALUE"),
        (["trainer.lr="], "expected KEY=VALUE"),
        (["trainer.lr=1e-6,,2e-6"], "empty value"),
        (["trainer.lr=1e-6", "trainer.lr=2e-6"], "given twice"),
    ],
)
def test_a_malformed_vary_is_refused(items: list[str], message: str) -> None:
    with pytest.raises(SweepError, match=message):
        parse_vary(items)


def test_the_grid_is_the_cross_product_with_the_last_key_fastest() -> None:
    arms = grid(parse_vary(["trainer.lr=1e-6,2e-6", "rollout.temperature=0.7,1.0"]))
    assert [a.name for a in arms] == [
        "lr=1e-06,temperature=0.7",
        "lr=1e-06,temperature=1.0",
        "lr=2e-06,temperature=0.7",
        "lr=2e-06,temperature=1.0",
    ]
    assert arms[1].overrides == {"trainer": {"lr": 1e-6}, "rollout": {"temperature": 1.0}}
    assert [a.name for a in grid([])] == ["base"]


def test_switching_the_estimator_leaves_the_base_estimators_options_behind(tmp_path: Path) -> None:
    """The showcase runs gd2po_snr with tau 0.8; GRPO and Hard do not take tau, so a plain merge of the
    arm over the base would fail to load them."""
    runs = plan(
        SHOWCASE,
        grid(parse_vary(["trainer.advantage.estimator=grpo,gd2po_hard,gd2po_snr"])),
        [0, 1],
        tmp_path,
    )
    assert [(r.arm.name, r.seed) for r in runs] == [
        ("estimator=grpo", 0),
        ("estimator=grpo", 1),
        ("estimator=gd2po_hard", 0),
        ("estimator=gd2po_hard", 1),
        ("estimator=gd2po_snr", 0),
        ("estimator=gd2po_snr", 1),
    ]
    loaded = [load_config(r.config_path) for r in runs]
    assert [c.trainer.advantage.estimator for c in loaded[::2]] == ["grpo", "gd2po_hard", "gd2po_snr"]
    assert loaded[4].trainer.advantage.tau == 0.8  # the same estimator keeps the base's options
    assert [c.run.seed for c in loaded[:2]] == [0, 1]
    assert [c.data.shuffle_seed for c in loaded[:2]] == [0, 1]  # the prompt order follows the seed
    assert loaded[0].rewards == load_config(SHOWCASE).rewards  # everything else is the base's
    assert runs[3].run_dir == tmp_path / "estimator=gd2po_hard" / "seed-1"


def test_a_varied_option_goes_only_to_the_estimators_that_take_it(tmp_path: Path) -> None:
    vary = parse_vary(["trainer.advantage.estimator=gdpo,gd2po_snr", "trainer.advantage.tau=0.5,0.9"])
    arms = grid(vary)
    assert [a.name for a in arms] == [
        "estimator=gdpo",
        "estimator=gd2po_snr,tau=0.5",
        "estimator=gd2po_snr,tau=0.9",
    ]
    runs = plan(SHOWCASE, arms, [0], tmp_path)
    assert [load_config(r.config_path).trainer.advantage.tau for r in runs[1:]] == [0.5, 0.9]


def test_the_ablations_are_options_of_gd2po_hard(tmp_path: Path) -> None:
    arms = grid(
        parse_vary(["trainer.advantage.estimator=gd2po_hard", "trainer.advantage.filter=false"])
        + parse_vary(["trainer.advantage.reweight=true"])
    )
    advantage = load_config(plan(SHOWCASE, arms, [0], tmp_path)[0].config_path).trainer.advantage
    assert (advantage.estimator, advantage.filter, advantage.reweight) == ("gd2po_hard", False, True)


def test_every_arm_that_would_fail_is_named_before_any_run(tmp_path: Path) -> None:
    # Without the estimator varied nothing is left out: tau on the base's gd2po_snr is fine, on grpo not.
    bad = grid(parse_vary(["trainer.lr=1e-6,-1", "trainer.nope=1"]))
    with pytest.raises(SweepError) as caught:
        plan(SHOWCASE, bad, [0], tmp_path)
    message = str(caught.value)
    assert "no run was started" in message
    assert "arm lr=1e-06,nope=1, seed 0" in message and "trainer.nope" in message
    assert "arm lr=-1,nope=1, seed 0" in message and "trainer.lr" in message


def test_an_exported_override_of_a_swept_key_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GD2PO_* variables win over the config file, so they would give every run the same value."""
    arms = grid(parse_vary(["trainer.advantage.estimator=grpo,gdpo"]))
    monkeypatch.setenv("GD2PO_RUN__SEED", "7")
    with pytest.raises(SweepError, match="unset GD2PO_RUN__SEED"):
        plan(SHOWCASE, arms, [0, 1], tmp_path)
    monkeypatch.delenv("GD2PO_RUN__SEED")
    monkeypatch.setenv("GD2PO_TRAINER__ADVANTAGE__ESTIMATOR", "grpo")
    with pytest.raises(SweepError, match="unset GD2PO_TRAINER__ADVANTAGE__ESTIMATOR"):
        plan(SHOWCASE, arms, [0], tmp_path)
    monkeypatch.setenv("GD2PO_TRAINER__LR", "1e-5")  # a key the sweep does not set stays the user's
    monkeypatch.delenv("GD2PO_TRAINER__ADVANTAGE__ESTIMATOR")
    assert load_config(plan(SHOWCASE, arms, [0], tmp_path)[0].config_path).trainer.lr == 1e-5


def test_the_cli_reports_a_bad_vary_without_running(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["sweep", str(SHOWCASE), "--vary", "trainer.nope=1", "--out", str(tmp_path / "s"), "--no-progress"],
    )
    assert result.exit_code == 1 and "trainer.nope" in result.output and "no run was started" in result.output
    assert not (tmp_path / "s" / "trainer.nope=1").exists() and not (tmp_path / "s" / "nope=1").exists()
