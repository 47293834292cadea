"""The axes and the case pass ``mypy --strict`` (configured in pyproject.toml): a misspelt option, a hook with the
wrong signature or another axis's setting read untyped fails here, not in a worker on a GPU."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install 'flux2bench[dev]')")

REPO = Path(__file__).resolve().parents[1]


def test_the_axes_and_the_case_pass_mypy_strict():
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]["strict"] is True
    stdout, stderr, status = mypy_api.run(["--config-file", str(REPO / "pyproject.toml"),
                                           str(REPO / "flux2bench" / "axes"), str(REPO / "flux2bench" / "case.py")])
    assert status == 0, stdout + stderr
    assert stdout.startswith("Success: no issues found")
