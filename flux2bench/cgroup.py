"""A cgroup v2 around a worker, to run it as if the host had only so much RAM: ``memory.max`` counts the page
cache too, so file-backed weights are evicted and read again as on a small machine, and ``memory.swap.max`` 0
keeps the cap from spilling into swap. The runner makes one cgroup per worker under the cgroup v2 root and
removes it when the worker has ended; the worker joins it first thing (``FLUX2BENCH_CGROUP``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flux2bench.units import GIB

ROOT = Path("/sys/fs/cgroup")


class CgroupUnavailable(Exception):
    """No writable cgroup v2 with the memory controller here; the message says what is missing."""


@dataclass
class MemoryCgroup:
    path: Path
    max_bytes: int

    def read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except OSError:
            return None

    def oom_kills(self) -> int | None:
        """How many processes the cap's OOM killer ended in this cgroup."""
        for line in (self.read("memory.events") or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def peak_gib(self) -> float | None:
        text = self.read("memory.peak")
        return int(text) / GIB if text and text.strip().isdigit() else None

    def record(self) -> dict:
        return {"max_ram_gib": self.max_bytes / GIB, "cgroup": str(self.path), "oom_kills": self.oom_kills(),
                "peak_gib": self.peak_gib(),
                "method": "cgroup v2 memory.max around the worker (the page cache counts), memory.swap.max 0"}

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass  # a process that outlived its worker keeps it; the next run's name differs


def create(name: str, max_bytes: int, root: Path = ROOT) -> MemoryCgroup:
    """A new cgroup ``root/name`` capped at ``max_bytes``; raises CgroupUnavailable where that cannot be done."""
    controllers = root / "cgroup.controllers"
    if not controllers.is_file():
        raise CgroupUnavailable(f"no cgroup v2 hierarchy at {root} (this host uses cgroup v1, or none)")
    if "memory" not in controllers.read_text().split():
        raise CgroupUnavailable(f"the memory controller is not available in {root}")
    path = root / name
    try:
        _delegate_memory(root)
        path.mkdir()
        (path / "memory.max").write_text(str(max_bytes))
        if (path / "memory.swap.max").exists():
            (path / "memory.swap.max").write_text("0")
    except OSError as exc:
        if path.is_dir():
            path.rmdir()
        raise CgroupUnavailable(f"cannot make a memory-capped cgroup under {root}: {exc}") from None
    return MemoryCgroup(path, max_bytes)


def _delegate_memory(root: Path) -> None:
    """Give the children of ``root`` the memory controller where nobody has yet (a fresh VM's root cgroup)."""
    subtree = root / "cgroup.subtree_control"
    if subtree.is_file() and "memory" not in subtree.read_text().split():
        subtree.write_text("+memory")


def join(path: str) -> None:
    """Move this process into the cgroup at ``path`` (a worker, before it allocates anything)."""
    Path(path, "cgroup.procs").write_text(str(os.getpid()))
