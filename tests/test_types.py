"""The axes and the case pass ``mypy --strict`` (configured in pyproject.toml): a misspelt option, a hook with the
wrong signature or another axis's setting read untyped fails here, not in a worker on a GPU."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is not installed (pip install 'flux2bench[dev]')")

REPO = Path(__file__).resolve().parents[1]


def test_the_axes_and_the_case_pass_mypy_strict():
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]["strict"] is True
    # In a process of its own: mypy raises the interpreter's recursion limit, which other tests rely on.
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", "flux2bench/axes",
                           "flux2bench/case.py"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("Success: no issues found")
