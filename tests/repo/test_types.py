"""The axes, the case, the runner, the supervisor, the executors and the command line pass ``mypy --strict``
(configured in pyproject.toml, which lists the files): a misspelt option, a hook with the wrong signature, another
axis's setting read untyped or an executor that does not fit its protocol fails here, not in a worker on a GPU."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from conftest import REPO

pytest.importorskip("mypy", reason="mypy is not installed (pip install 'flux2bench[dev]')")
pytestmark = pytest.mark.slow  # mypy checks the strictly typed packages from scratch in a process of its own


def test_the_strictly_typed_packages_pass_mypy_strict():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["strict"] is True
    assert {"flux2bench/runner", "flux2bench/executors", "flux2bench/cli", "flux2bench/axes"} <= set(config["files"])
    # In a process of its own: mypy raises the interpreter's recursion limit, which other tests rely on.
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "pyproject.toml"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("Success: no issues found")
