"""``data.overlong_prompts`` on the demo data with SmolLM2's real tokenizer and chat template: ``filter``
(the default, the release's ``filter_overlong_prompts=True``) drops every prompt over the limit before
the first batch and says how many of how many; ``error`` refuses to start; ``truncate_left`` keeps them
and counts them. Right values: the release's rule (verl ``RLHFDataset.maybe_filter_out_long_prompts``)
keeps a prompt when its chat-templated length with the generation prompt is <= the limit; on these 399
prompts at 1,024 tokens that drops 75 (median 757 tokens, longest 2,148)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from proto.config import ConfigError, ExperimentConfig, load_config
from rollout_service.prompts import OverlongPrompts, PromptSource

DATA = Path(__file__).resolve().parents[2] / "data" / "tool_calling" / "rlla_sft400" / "train.parquet"
LIMIT, LOADED, OVERLONG = 1024, 399, 75


@pytest.fixture(scope="module")
def lengths(smollm2_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    def measure(records) -> list[int]:
        texts = [
            tokenizer.apply_chat_template(
                [m.model_dump() for m in r.messages], add_generation_prompt=True, tokenize=False
            )
            for r in records
        ]
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return measure


def source() -> PromptSource:
    return PromptSource([DATA], prompt_field="prompt", label_field="reward_model.ground_truth", seed=0)


def test_filter_drops_every_overlong_prompt_and_reports_it(lengths) -> None:
    prompts = source()
    every_id = {r.prompt_id for r in prompts.records}
    report = prompts.limit_length(lengths, LIMIT, "filter")
    assert (report.loaded, report.overlong, report.dropped, report.truncated) == (
        LOADED,
        OVERLONG,
        OVERLONG,
        0,
    )
    assert report.longest == 2148
    assert report.describe() == (
        "data.overlong_prompts=filter: dropped 75 of 399 prompts longer than 1024 tokens (longest 2148); "
        "training on 324"
    )
    kept = {r.prompt_id for r in prompts.records}
    assert len(kept) == LOADED - OVERLONG and max(lengths(prompts.records)) <= LIMIT
    # Two epochs: every kept prompt once per epoch, a dropped one never.
    drawn = [r.prompt_id for r in prompts.take(2 * len(kept))]
    assert set(drawn) == kept and len(set(drawn[: len(kept)])) == len(kept)
    assert not set(drawn) & (every_id - kept)


def test_error_refuses_to_start_naming_the_count_and_the_fix(lengths) -> None:
    with pytest.raises(OverlongPrompts, match=r"refused 75 of 399 prompts longer than 1024 tokens") as info:
        source().limit_length(lengths, LIMIT, "error")
    assert "data.overlong_prompts: filter" in str(info.value)
    assert source().limit_length(lengths, 4096, "error").overlong == 0  # nothing over the limit: starts


def test_truncate_left_keeps_every_prompt_and_counts_the_cut_ones(lengths) -> None:
    prompts = source()
    report = prompts.limit_length(lengths, LIMIT, "truncate_left")
    assert (len(prompts.records), report.truncated, report.dropped) == (LOADED, OVERLONG, 0)
    assert "left-truncated (system message cut) 75 of 399" in report.describe()


def test_filter_refuses_a_dataset_with_no_prompt_that_fits(lengths) -> None:
    with pytest.raises(OverlongPrompts, match="no prompt fits"):
        source().limit_length(lengths, 10, "filter")


def test_the_setting_defaults_to_filter_and_rejects_other_values(tmp_path: Path) -> None:
    assert ExperimentConfig().data.overlong_prompts == "filter"
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  overlong_prompts: truncate\n")
    with pytest.raises(ConfigError, match="data.overlong_prompts"):
        load_config(bad)
