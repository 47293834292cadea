"""The run directory: ``run.json`` plus one durable record per finished case.

A run directory holds ``run.json`` (the scenario, the environment, when it started) and one
``results/<case key>.json`` per finished case, each written atomically (temporary file, fsync, rename), so that a
crash or ``kill -9`` of the runner never leaves a truncated record. A record that does not parse (written by hand,
damaged on disk) is not a finished case: the runner moves it to ``invalid/`` and runs the case again. One runner at
a time holds a run directory (``.lock``), and every file a record names is resolved inside the directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from flux2bench.results import CaseResult

LOCK_FILE = ".lock"


class RunDirError(Exception):
    """A run directory that cannot be used as asked; the message is for the user."""


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rank_suffix(rank: int) -> str:
    """Rank 0's files keep the case's own names; the other ranks' of a multi-GPU case carry their rank."""
    return f".rank{rank}" if rank else ""


def inside(root: Path, name: str) -> Path:
    """``root / name``, refused (ValueError) when it resolves outside ``root`` (an absolute path, ``..``, a link)."""
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"{name!r} is outside the run directory {root}")
    return path


@dataclass
class Records:
    """The records of a run directory: those that parse, by key, and those that do not, with the reason."""

    valid: dict[str, CaseResult] = field(default_factory=dict)
    invalid: dict[Path, str] = field(default_factory=dict)


class RunStore:
    """A run directory: ``run.json`` plus one durable record per finished case."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    def subdir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def path(self, name: str) -> Path:
        """A file a record names, resolved inside the run directory."""
        return inside(self.root, name)

    @classmethod
    def create(cls, root: str | Path, meta: dict[str, Any]) -> RunStore:
        store = cls(root)
        store.results_dir.mkdir(parents=True, exist_ok=False)
        store.update_meta(meta)
        return store

    @classmethod
    def open(cls, root: str | Path) -> RunStore:
        store = cls(root)
        if not (store.root / "run.json").is_file():
            raise FileNotFoundError(f"{store.root} is not a flux2bench run directory (no run.json)")
        store.meta  # noqa: B018 - fails early, with the reason, on a damaged run.json
        return store

    @property
    def meta(self) -> dict[str, Any]:
        path = self.root / "run.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise RunDirError(f"{path}: unreadable run description ({exc})") from None
        if not isinstance(meta, dict):
            raise RunDirError(f"{path}: expected a JSON object")
        return meta

    def update_meta(self, meta: dict[str, Any]) -> None:
        write_atomic(self.root / "run.json", json.dumps(meta, indent=1, sort_keys=True, default=str))

    def put_file(self, name: str, data: bytes) -> Path:
        """Write a file a worker made elsewhere (another node) at ``name`` inside the run directory, atomically."""
        path = inside(self.root, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def write(self, result: CaseResult) -> Path:
        self.results_dir.mkdir(exist_ok=True)
        path = self.results_dir / f"{result.key}.json"
        write_atomic(path, result.to_json())
        return path

    def records(self) -> Records:
        records = Records()
        for path in sorted(self.results_dir.glob("*.json")):
            try:
                record = CaseResult.from_json(path.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                records.invalid[path] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                continue
            if record.key != path.stem:
                records.invalid[path] = f"the record's key {record.key!r} is not its file name"
                continue
            records.valid[record.key] = record
        return records

    def completed_keys(self) -> set[str]:
        return set(self.records().valid)

    def results(self) -> list[CaseResult]:
        """The valid records, in the order the scenario listed the cases (the order of run.json's case keys)."""
        order = {key: i for i, key in enumerate(self.meta.get("case_keys", []))}
        return sorted(self.records().valid.values(), key=lambda r: (order.get(r.key, len(order)), r.key))

    def set_aside_invalid(self) -> dict[Path, str]:
        """Move records that do not parse to ``invalid/`` (so that their cases run again); returns where each went,
        with the reason."""
        moved = {}
        for path, reason in self.records().invalid.items():
            target = self.subdir("invalid") / path.name
            os.replace(path, target)
            moved[target] = reason
        return moved

    def clean_tmp(self) -> None:
        """Remove what workers of an interrupted run left in ``tmp/``."""
        shutil.rmtree(self.root / "tmp", ignore_errors=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run directory for this process; a second runner is refused with the holder's PID."""
        path = self.root / LOCK_FILE
        with open(path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "unknown"
                raise RunDirError(f"{self.root} is in use by another flux2bench run (pid {holder}); wait for it to "
                                  "end, or stop it") from None
            lock.seek(0)
            lock.truncate()
            lock.write(str(os.getpid()))
            lock.flush()
            try:
                yield
            finally:
                lock.truncate(0)
