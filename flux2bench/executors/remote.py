"""What any executor that runs cases on other machines needs: the files a case's worker wrote there, which travel
back with its record, and the environment of a node, captured once per node.

Nodes share no filesystem with the driver: a node supervises each case in a run directory of its own, then sends
back the record and every file the worker wrote for the case (log, timelines, images and latents that drift
needs); the driver writes them into the one run directory, the single source of truth.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flux2bench.executors import CaseSink
from flux2bench.results import CaseResult

# The run-directory folders whose files of one case travel back to the driver.
CASE_FOLDERS = ("logs", "timelines", "images", "latents", "profiles")


def case_files(root: Path, key: str) -> dict[str, bytes]:
    """Every file a worker wrote for the case ``key`` under ``root``, by its path relative to ``root``."""
    files = {}
    for folder in CASE_FOLDERS:
        for path in sorted((root / folder).glob(f"{key}[.-]*")):
            if path.is_file():
                files[str(path.relative_to(root))] = path.read_bytes()
    return files


def remove_case_files(root: Path, key: str) -> None:
    """What an earlier attempt of the case left in a node's run directory."""
    for stale in case_files(root, key):
        (root / stale).unlink(missing_ok=True)


@dataclass
class CaseBundle:
    """What a node sends back for one case: its record and the files the record and drift need."""

    record: str
    files: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def of(cls, result: CaseResult, root: Path) -> CaseBundle:
        return cls(result.to_json(), case_files(root, result.key))

    def deliver(self, sink: CaseSink) -> None:
        sink.finished(CaseResult.from_json(self.record), self.files)


def node_environment(timeout_s: float = 300) -> dict[str, Any]:
    """This node's environment (GPUs, driver, libraries), captured in a short-lived process so that no CUDA context
    outlives it beside a case's worker."""
    script = ("import json; from flux2bench.trackers.environment import capture_environment as c; "
              "print(json.dumps(c(), default=str))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout_s,
                         check=True)
    environment: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return environment
