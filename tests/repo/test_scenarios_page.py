"""docs/scenarios.md names every scenario shipped in scenarios/."""

from __future__ import annotations

from doc_tables import REPO


def test_the_scenario_reference_names_every_shipped_scenario():
    page = (REPO / "docs" / "scenarios.md").read_text()
    shipped = sorted(path.name for path in (REPO / "scenarios").glob("*.yaml"))
    assert shipped and [name for name in shipped if f"`{name}`" not in page] == []
