"""README and docs/ point only at what exists: files, headings, committed run directories, scenario fields."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from flux2bench.scenario import AXES, Block, ScenarioFile

from conftest import REPO

ROOT = REPO
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCENARIO_REFERENCE = ROOT / "docs" / "scenarios.md"

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# A committed run directory is named <scenario or purpose>-<date>[-<time>]: reports/fastest-20261127-042118.
RUN_DIR = r"[a-z0-9][a-z0-9.-]*-\d{8}(?:-\d{6})?"
REPORTS_PATH = re.compile(rf"reports/({RUN_DIR})((?:/[\w.-]+)*)")
BARE_RUN_DIR = re.compile(rf"`({RUN_DIR})`")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def test_there_is_a_docs_page_per_topic_and_readme_links_each():
    readme = (ROOT / "README.md").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert len(pages) >= 10
    assert [p for p in pages if f"(docs/{p})" not in readme] == []


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 260


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_to_an_existing_file_and_heading(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_run_directory_named_is_committed(page):
    text = page.read_text()
    missing = [f"reports/{run}{rest}" for run, rest in REPORTS_PATH.findall(text)
               if not (ROOT / "reports" / run / rest.lstrip("/")).exists()]
    missing += [run for run in BARE_RUN_DIR.findall(text) if not (ROOT / "reports" / run).is_dir()]
    assert missing == []


def test_readme_cites_run_directories():
    readme = (ROOT / "README.md").read_text()
    assert len(set(BARE_RUN_DIR.findall(readme)) | {run for run, _ in REPORTS_PATH.findall(readme)}) >= 5


def _literal_values(annotation) -> set[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return {value for value in typing.get_args(annotation) if isinstance(value, str)}
    return set().union(*(_literal_values(arg) for arg in typing.get_args(annotation)))


def _reference_table() -> list[tuple[list[str], str]]:
    """The scenario reference's rows: the fields the first column names, and the "expands?" column."""
    rows = []
    for line in SCENARIO_REFERENCE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            rows.append((re.findall(r"`(\w+)`", cells[0]), cells[2]))
    return rows


def test_the_scenario_reference_names_every_field_and_option_value():
    text = re.sub(r"```.*?```", "", SCENARIO_REFERENCE.read_text(), flags=re.S)
    named = set(re.findall(r"`([^`]+)`", text))
    fields = set(Block.model_fields) | set(ScenarioFile.model_fields)
    assert sorted(fields - named) == []
    values = set().union(*(_literal_values(f.annotation) for f in Block.model_fields.values()))
    assert sorted(values - named) == []


def test_the_scenario_reference_table_names_real_fields_and_says_which_expand():
    rows = _reference_table()
    assert rows
    for names, expands in rows:
        assert names and set(names) <= set(Block.model_fields), names
        assert expands in ("yes", "no"), (names, expands)
        if expands == "yes":
            assert set(names) <= set(AXES), names
        else:
            assert not set(names) & set(AXES), names
