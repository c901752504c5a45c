"""Every Grafana dashboard type-checks against Grafana's own schema.

Each ``deploy/grafana/dashboards/*.json`` is embedded as a typed literal, ``const dashboard:
GD2PODashboard = <json>``, and compiled with ``tsc --strict`` against ``@grafana/schema`` pinned to the
Grafana image that docker-compose.yml runs (deploy/grafana/schema-check: the type, its tsconfig and the
npm lock file; ``make setup`` installs it). A key Grafana does not know — at dashboard, panel, panel
option or query level — is an excess property, so a misspelt key fails here instead of being dropped
silently when Grafana loads the dashboard.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_refs import DASHBOARDS
from deploy_tools import DEPLOY, REPO_ROOT, SETUP_HINT

CHECK = DEPLOY / "grafana" / "schema-check"
TSC = CHECK / "node_modules" / "typescript" / "bin" / "tsc"


def typecheck(tmp_path: Path, dashboards: dict[str, dict]) -> dict[str, list[str]]:
    """name → tsc errors of that dashboard (empty when it type-checks); one compiler run for all."""
    node = shutil.which("node")
    if node is None or not TSC.is_file():
        pytest.fail(f"node or the schema check's npm packages are missing: {SETUP_HINT}", pytrace=False)
    files = []
    for name, dashboard in dashboards.items():
        source = tmp_path / f"{name}.ts"
        source.write_text(
            f"import type {{ GD2PODashboard }} from {json.dumps(str(CHECK / 'dashboard'))};\n\n"
            f"export const dashboard: GD2PODashboard = {json.dumps(dashboard, indent=2)};\n"
        )
        files.append(str(source))
    tsconfig = tmp_path / "tsconfig.json"
    tsconfig.write_text(json.dumps({"extends": str(CHECK / "tsconfig.json"), "files": files}))
    result = subprocess.run(
        [node, str(TSC), "-p", str(tsconfig)], capture_output=True, text=True, timeout=180
    )
    errors: dict[str, list[str]] = {name: [] for name in dashboards}
    for line in result.stdout.splitlines():
        match = re.match(r"(.+?)\.ts\(\d+,\d+\): error (.*)", line)
        if match and Path(match.group(1)).name in errors:
            errors[Path(match.group(1)).name].append(match.group(2))
        elif line.strip() and not line.startswith(" "):
            pytest.fail(f"tsc failed outside the dashboards:\n{result.stdout}{result.stderr}")
    assert (result.returncode != 0) == any(errors.values()), result.stdout + result.stderr
    return errors


def test_schema_is_pinned_to_the_grafana_that_compose_runs() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    grafana_version = compose["services"]["grafana"]["image"].rsplit(":", 1)[1]
    package = json.loads((CHECK / "package.json").read_text())
    lock = json.loads((CHECK / "package-lock.json").read_text())
    assert package["devDependencies"]["@grafana/schema"] == grafana_version
    assert lock["packages"]["node_modules/@grafana/schema"]["version"] == grafana_version


def test_every_dashboard_type_checks_against_grafanas_schema(tmp_path: Path) -> None:
    assert DASHBOARDS
    errors = typecheck(
        tmp_path, {path.stem.replace("-", "_"): json.loads(path.read_text()) for path in DASHBOARDS}
    )
    assert not any(errors.values()), errors


def test_a_misspelt_key_at_any_level_fails_the_check(tmp_path: Path) -> None:
    """The check has teeth: one misspelling per level of the shipped dashboard, each named by tsc."""
    original = json.loads(DASHBOARDS[0].read_text())
    panel_at = next(i for i, p in enumerate(original["panels"]) if p.get("targets") and p.get("options"))

    def mutated(edit) -> dict:
        dashboard = json.loads(json.dumps(original))
        edit(dashboard, dashboard["panels"][panel_at])
        return dashboard

    def dashboard_level(d: dict, _panel: dict) -> None:
        d["schemaVersoin"] = d.pop("schemaVersion")

    def panel_level(_d: dict, panel: dict) -> None:
        panel["gridPoss"] = panel.pop("gridPos")

    def target_level(_d: dict, panel: dict) -> None:
        panel["targets"][0]["legendFromat"] = panel["targets"][0].pop("legendFormat")

    def option_level(_d: dict, panel: dict) -> None:
        panel["options"]["legend"]["showLegnd"] = panel["options"]["legend"].pop("showLegend")

    cases = {
        "dashboard": (dashboard_level, "schemaVersoin"),
        "panel": (panel_level, "gridPoss"),
        "target": (target_level, "legendFromat"),
        "option": (option_level, "showLegnd"),
    }
    errors = typecheck(tmp_path, {name: mutated(edit) for name, (edit, _) in cases.items()})
    for name, (_, key) in cases.items():
        assert any(f"'\"{key}\"' does not exist" in error for error in errors[name]), (name, errors[name])
