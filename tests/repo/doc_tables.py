"""Reading the documentation's Markdown tables and checking a printed number against the records it reports: at the
precision it is printed with, as one value, a list or a range."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from flux2bench.results import CaseResult
from flux2bench.store import RunStore

REPO = Path(__file__).resolve().parents[2]
REPORTS = REPO / "reports"
NUMBER = re.compile(r"\d+(?:\.\d+)?")


@dataclass
class Table:
    heading: str
    header: list[str]
    rows: list[list[str]]

    def column(self, starts: str) -> int:
        (index,) = [i for i, name in enumerate(self.header) if name.startswith(starts)]
        return index


def _cells(line: str) -> list[str]:
    return [cell.strip().replace("**", "") for cell in line.strip().strip("|").split("|")]


def tables(path: Path) -> list[Table]:
    """The Markdown tables of a page, each with the heading above it (bold marks dropped)."""
    found, heading, lines = [], "", path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(_cells(row))
            found.append(Table(heading, _cells(line), rows))
    return found


def table_with(path: Path, *headers: str, heading: str = "") -> Table:
    """The page's one table with these headers (each the start of a column's) under a heading that holds
    ``heading``."""
    (table,) = [t for t in tables(path) if all(any(h.startswith(name) for h in t.header) for name in headers)
                and heading in t.heading]
    return table


@cache
def run(path: str) -> RunStore:
    return RunStore.open(REPORTS / path)


def record(path: str, key: str | None = None) -> CaseResult:
    """A case of a run directory by its key, or the run's only case."""
    records = run(path).results()
    if key is None:
        (only,) = records
        return only
    (found,) = [r for r in records if r.key == key]
    return found


def backs(printed: str, value: float | None) -> bool:
    """Whether ``value`` is ``printed`` at the printed precision (half a unit of its last digit either way)."""
    if value is None:
        return False
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(value - float(printed)) <= 0.5 * 10 ** -decimals + 1e-9


def check(cell: str, values: list[float | None], what: str) -> None:
    """One cell against its records' values: a list in the records' order, a range (and median), or one value."""
    text = re.sub(r"\([^)]*\)", "", cell).strip()  # remarks in parentheses are words
    assert values, f"{what}: no record"
    if not NUMBER.search(text):
        return
    if ", median " in text:
        text, median = text.split(", median ")
        assert backs(median, statistics.median(values)), f"{what}: median {median}, records {values}"
    if "-" in text:
        low, high = (part.strip() for part in text.split("-"))
        assert backs(low, min(values)) and backs(high, max(values)), f"{what}: {cell}, records {values}"
    elif "," in text:
        listed = [part.strip() for part in text.split(",")]
        assert len(listed) == len(values) and all(map(backs, listed, values)), f"{what}: {cell}, records {values}"
    else:
        assert all(backs(text, v) for v in values), f"{what}: {cell}, records {values}"
