"""The checked-in JSON Schemas must match the models (regenerate with python -m proto.jsonschema)."""

import json

from proto.jsonschema import SCHEMA_DIR, render_schemas, write_schemas


def test_checked_in_schemas_are_up_to_date() -> None:
    rendered = render_schemas()
    on_disk = {path.name: path.read_text() for path in SCHEMA_DIR.glob("*.json")}
    stale = sorted(name for name in rendered if on_disk.get(name) != rendered[name])
    extra = sorted(set(on_disk) - set(rendered))
    assert not stale and not extra, (
        f"proto/schemas is stale (changed: {stale}, orphaned: {extra}); run `python -m proto.jsonschema`"
    )


def test_generator_detects_a_changed_model(tmp_path) -> None:
    write_schemas(tmp_path)
    schema = json.loads((tmp_path / "ScoredGroup.json").read_text())
    assert {"group_id", "completions", "rewards", "policy_version"} <= set(schema["properties"])
    assert schema["properties"]["completions"]["minItems"] == 1
