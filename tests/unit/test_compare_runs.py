"""`gd2po compare`: runs side by side from their metrics.jsonl and config.yaml; runs that differ only in
their seed are one arm, drawn as its mean across seeds with a band."""

import json
from pathlib import Path

import matplotlib.image
import pytest
from typer.testing import CliRunner

from gd2po.cli import app
from gd2po.compare import Final, curve, load_runs, summarise, write_comparison


def fake_run(
    root: Path,
    name: str,
    estimator: str,
    rewards: dict[str, list[float]],
    conflict: list[float],
    seed: int = 0,
) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        f"run: {{name: {name}, seed: {seed}}}\ndata: {{shuffle_seed: {seed}}}\n"
        f"trainer: {{advantage: {{estimator: {estimator}}}}}\n"
    )
    with (run_dir / "metrics.jsonl").open("w") as out:
        for step, ratio in enumerate(conflict, start=1):
            record = {"step": step, "conflict_ratio": ratio, "keep_ratio": 1 - ratio}
            record |= {f"reward_mean/{n}": values[step - 1] for n, values in rewards.items()}
            out.write(json.dumps(record) + "\n")
        out.write('{"step": 4, "conflict')  # a half-written last line is ignored
    return run_dir


def test_summary_has_last_and_mean_per_run_and_signal(tmp_path: Path) -> None:
    grpo = fake_run(tmp_path, "job-grpo", "grpo", {"a": [0.0, 0.5, 1.0]}, [0.0, 0.0, 0.0])
    snr = fake_run(
        tmp_path, "job-snr", "gd2po_snr", {"a": [0.0, 1.0, 1.0], "b": [2.0, 4.0, 6.0]}, [0.5, 0.25, 0.0]
    )
    runs = load_runs([grpo, snr])
    assert list(runs) == ["job-grpo · grpo", "job-snr · gd2po_snr"]
    summary = summarise(runs)
    assert list(summary) == ["reward_mean/a", "reward_mean/b", "conflict_ratio", "keep_ratio"]
    assert summary["reward_mean/a"] == {
        "job-grpo · grpo": Final(1.0, 0.5, 1.0, 1.0, 1),
        "job-snr · gd2po_snr": Final(1.0, 2 / 3, 1.0, 1.0, 1),
    }
    assert summary["reward_mean/b"] == {"job-snr · gd2po_snr": Final(6.0, 4.0, 6.0, 6.0, 1)}  # logged by one
    assert summary["keep_ratio"]["job-snr · gd2po_snr"] == Final(1.0, 0.75, 1.0, 1.0, 1)


def test_cli_writes_a_figure_and_a_table(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, f"job-{e}", e, {"a": [0.1, 0.2]}, [0.1, 0.3]) for e in ("gdpo", "gd2po_hard")]
    result = CliRunner().invoke(app, ["compare", *map(str, runs), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    image = matplotlib.image.imread(tmp_path / "cmp" / "comparison.png")
    assert image.shape[0] > 200 and image.shape[1] > 600
    text = (tmp_path / "cmp" / "comparison.txt").read_text()
    assert "job-gdpo · gdpo" in text and "job-gd2po_hard · gd2po_hard" in text and "0.300 (0.200)" in text


def test_errors_name_the_problem(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    run = fake_run(tmp_path, "job", "grpo", {"a": [1.0]}, [0.0])
    with pytest.raises(FileNotFoundError, match="no step records in .*empty/metrics.jsonl"):
        write_comparison([run, empty], tmp_path / "out", show=False)
    result = CliRunner().invoke(app, ["compare", str(run)])
    assert result.exit_code == 2 and "at least two run folders" in result.output


def sweep_layout(root: Path) -> list[Path]:
    """Two arms × three seeds, as `gd2po sweep` lays them out; seed s of an arm adds s to its rewards."""
    runs = []
    for estimator, rewards in (("grpo", [0.0, 1.0, 2.0]), ("gd2po_hard", [1.0, 1.0, 1.0])):
        for seed in (0, 1, 2):
            runs.append(
                fake_run(
                    root / f"estimator={estimator}",
                    f"seed-{seed}",
                    estimator,
                    {"a": [r + seed for r in rewards]},
                    [0.1 * seed] * 3,
                    seed=seed,
                )
            )
    return runs


def test_runs_differing_only_in_their_seed_are_one_arm_with_a_band(tmp_path: Path) -> None:
    runs = load_runs(sweep_layout(tmp_path))
    assert list(runs) == ["estimator=grpo · grpo × 3 seeds", "estimator=gd2po_hard · gd2po_hard × 3 seeds"]
    grpo = curve(runs["estimator=grpo · grpo × 3 seeds"], "reward_mean/a")
    assert grpo is not None and grpo.seeds == 3
    assert grpo.steps == [1.0, 2.0, 3.0]
    assert grpo.mean == [1.0, 2.0, 3.0]  # seeds +0, +1, +2 around the arm's curve
    assert (grpo.low, grpo.high) == ([0.0, 1.0, 2.0], [2.0, 3.0, 4.0])
    sd = curve(runs["estimator=grpo · grpo × 3 seeds"], "reward_mean/a", band="sd")
    assert (
        sd is not None
        and sd.low == pytest.approx([0.0, 1.0, 2.0])
        and sd.high == pytest.approx([2.0, 3.0, 4.0])
    )
    summary = summarise(runs)
    assert summary["reward_mean/a"]["estimator=gd2po_hard · gd2po_hard × 3 seeds"] == Final(
        2.0, 2.0, 1.0, 3.0, 3
    )
    assert summary["conflict_ratio"]["estimator=grpo · grpo × 3 seeds"] == Final(
        pytest.approx(0.1), pytest.approx(0.1), 0.0, 0.2, 3
    )


def test_a_band_averages_only_the_steps_every_seed_logged(tmp_path: Path) -> None:
    short = fake_run(tmp_path / "arm", "seed-0", "gdpo", {"a": [1.0, 2.0]}, [0.0, 0.0], seed=0)
    long = fake_run(tmp_path / "arm", "seed-1", "gdpo", {"a": [3.0, 4.0, 5.0]}, [0.0] * 3, seed=1)
    other = fake_run(tmp_path, "other", "grpo", {"a": [0.0]}, [0.0])
    runs = load_runs([short, long, other])
    found = curve(runs["arm · gdpo × 2 seeds"], "reward_mean/a")
    assert found is not None and (found.steps, found.mean) == ([1.0, 2.0], [2.0, 3.0])


def test_the_cli_draws_bands_and_tables_the_spread(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", *map(str, sweep_layout(tmp_path)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "comparison.txt").read_text()
    assert "[min, max] across seeds" in text and "3.000 [2.000, 4.000] (2.000)" in text
    result = CliRunner().invoke(
        app, ["compare", *map(str, sweep_layout(tmp_path / "b")), "--out", str(out), "--band", "sd"]
    )
    assert result.exit_code == 0, result.output
    assert "[mean ± 1 sd] across seeds" in (out / "comparison.txt").read_text()
    assert matplotlib.image.imread(out / "comparison.png").shape[1] > 600
