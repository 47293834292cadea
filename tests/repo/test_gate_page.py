"""docs/gate.md's sample rules file is one that the gate accepts for the scenario the example GPU workflow gates."""

from __future__ import annotations

import re

from doc_tables import REPO

from flux2bench.compare.rules import load_rules
from flux2bench.scenario import load_scenario


def sample_rules() -> str:
    page = (REPO / "docs" / "gate.md").read_text()
    section = page.split("## gate.yaml", 1)[1]
    (sample,) = re.findall(r"```yaml\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    return sample


def test_the_sample_gate_yaml_loads_and_overrides_only_blocks_of_the_gated_scenario(tmp_path):
    workflow = (REPO / "examples" / "github-actions-gpu.yml").read_text()
    assert "--rules gate.yaml" in workflow and "scenarios/ci.yaml" in workflow
    rules_file = tmp_path / "gate.yaml"
    rules_file.write_text(sample_rules())
    rules = load_rules(rules_file)
    _, blocks = load_scenario(REPO / "scenarios" / "ci.yaml")
    assert rules.blocks and set(rules.blocks) <= set(blocks)
