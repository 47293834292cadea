"""The run directory: ``run.json`` plus one durable record per finished case.

A run directory holds ``run.json`` (the scenario, the environment, when it started) and one
``results/<case key>.json`` per finished case, each written atomically (temporary file, fsync, rename), so that a
crash or ``kill -9`` of the runner never leaves a truncated record. A record that does not parse (written by hand,
damaged on disk) is not a finished case: the runner moves it to ``invalid/`` and runs the case again. One runner at
a time holds a run directory (``.lock``), and every file a record names is resolved inside the directory.

Nothing in a run directory can redirect a write: every file the store writes is created without following a link
(a temporary with ``O_EXCL | O_NOFOLLOW``, then renamed over the target), and a run directory that holds a link, or
a folder where a file belongs (or the reverse), is refused before anything is written.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from flux2bench.results import CaseResult

LOCK_FILE = ".lock"
# What the store expects in a run directory: these names are files, these folders.
STORE_FILES = ("run.json", "scenario.yaml", LOCK_FILE)
STORE_FOLDERS = ("results", "tmp", "invalid", "timelines", "locks")
RUN_DIR_NAME_ATTEMPTS = 1000


class RunDirError(Exception):
    """A run directory that cannot be used as asked; the message is for the user."""


def open_new(path: Path) -> int:
    """A file descriptor for writing ``path``, which must not exist yet; never follows a link."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write ``path`` whole or not at all: a fresh temporary (a leftover one, or a link in its place, is removed,
    never followed), fsynced, renamed over ``path`` (which replaces a link rather than writing through it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    try:
        with os.fdopen(open_new(tmp), "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)  # no 0-byte temporary left behind on a full or read-only disk
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def writable_folder_problem(folder: Path, option: str) -> str | None:
    """Why no file can be made in ``folder`` (created if missing), or None."""
    existing = next(f for f in (folder, *folder.parents) if f.exists())
    if not existing.is_dir():
        return f"{option} {folder}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{option} {folder}: {existing} cannot be written"
    return None


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
        if path.is_symlink() or not path.is_dir():
            raise RunDirError(f"{path} is not a folder; the run directory {self.root} is damaged")
        return path

    def check_layout(self) -> None:
        """Refuse a run directory that holds a link anywhere, or a folder where the store writes a file (or the
        reverse): writing into it could land outside the directory or destroy what is not the run's."""
        for name in (*STORE_FILES, *STORE_FOLDERS):
            path = self.root / name
            if path.is_symlink():
                raise RunDirError(f"{path} is a link; a run directory holds only its own files, so this one is "
                                  "refused (replace the link by the file it points to, or remove it)")
            if name in STORE_FILES and path.exists() and not path.is_file():
                raise RunDirError(f"{path} is not a file; the run directory {self.root} is damaged")
            if name in STORE_FOLDERS and path.exists() and not path.is_dir():
                raise RunDirError(f"{path} is not a folder; the run directory {self.root} is damaged")
        for folder, dirs, files in os.walk(self.root):
            for name in dirs + files:
                if os.path.islink(os.path.join(folder, name)):
                    raise RunDirError(f"{os.path.join(folder, name)} is a link; a run directory holds only its own "
                                      "files, so this one is refused (replace the link by the file, or remove it)")

    def path(self, name: str) -> Path:
        """A file a record names, resolved inside the run directory."""
        return inside(self.root, name)

    @classmethod
    def create(cls, root: str | Path, meta: dict[str, Any]) -> RunStore:
        store = cls(root)
        store.results_dir.mkdir(parents=True, exist_ok=False)  # exclusive: two runs never share a directory
        store.update_meta(meta)
        return store

    @classmethod
    def create_unique(cls, parent: Path, stem: str, meta: dict[str, Any]) -> RunStore:
        """A new run directory ``parent/stem``, else ``stem-2``, ``stem-3``...: the first name no other run took,
        also when runs start at once (each name is taken by an exclusive mkdir); ``meta['run_id']`` is its name."""
        for n in range(1, RUN_DIR_NAME_ATTEMPTS + 1):
            root = parent / (stem if n == 1 else f"{stem}-{n}")
            parent.mkdir(parents=True, exist_ok=True)
            try:
                root.mkdir()  # exclusive: the first run to make it owns it
            except FileExistsError:
                continue
            return cls.create(root, {**meta, "run_id": root.name})
        raise RunDirError(f"{parent}: {RUN_DIR_NAME_ATTEMPTS} run directories named {stem}* already exist")

    @classmethod
    def open(cls, root: str | Path) -> RunStore:
        store = cls(root)
        if not (store.root / "run.json").exists() and not (store.root / "run.json").is_symlink():
            raise FileNotFoundError(f"{store.root} is not a flux2bench run directory (no run.json)")
        store.check_layout()
        store.meta  # noqa: B018 - fails early, with the reason, on a damaged run.json
        return store

    def owns(self, path: Path) -> bool:
        """Whether ``path`` is one of the run directory's own files (or inside one of its folders), which no
        command but the store may write."""
        try:
            relative = path.resolve().relative_to(self.root.resolve())
        except ValueError:
            return False
        return bool(relative.parts) and (len(relative.parts) > 1 or path.exists() or relative.parts[0] in STORE_FILES)

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
        """Write a file a worker made elsewhere (another node) at ``name`` inside the run directory, atomically and
        without following a link: the name comes from the node, so a link in its place is replaced, its folder must
        lie inside the run directory, and the store's own files are refused."""
        relative = Path(name)
        folder = inside(self.root, str(relative.parent))
        path = folder / relative.name
        if relative.name in ("", ".", "..") or path.parent == self.root.resolve() and relative.name in STORE_FILES:
            raise ValueError(f"{name!r} is not a file a node may write in the run directory {self.root}")
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        return path

    def write(self, result: CaseResult) -> Path:
        path = self.subdir("results") / f"{result.key}.json"
        write_atomic(path, result.to_json())
        return path

    def records(self) -> Records:
        records = Records()
        for path in sorted(self.results_dir.glob("*.json")):
            try:
                record = read_record(path)
            except (OSError, ValueError) as exc:
                records.invalid[path] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                continue
            records.valid[record.key] = record
        return records

    def incomplete(self) -> list[str]:
        """Why the run directory does not hold a result for every case of its scenario, one line each (none when
        complete): cases without a record, records set aside as invalid, cases this machine could not run."""
        records = self.records()
        lines = []
        missing = [key for key in self.meta.get("case_keys", []) if key not in records.valid]
        if missing:
            lines.append(f"{len(missing)} case(s) without a result: {', '.join(missing)}")
        set_aside = sorted(records.invalid) + sorted((self.root / "invalid").glob("*.json"))
        if set_aside:
            lines.append(f"{len(set_aside)} record(s) set aside as invalid: "
                         f"{', '.join(str(p.relative_to(self.root)) for p in set_aside)}")
        lacking = [key for key, record in records.valid.items() if record.machine_lacks]
        if lacking:
            lines.append(f"{len(lacking)} case(s) the machine could not run (not a result about the setup): "
                         f"{', '.join(lacking)}")
        return lines

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
        self.check_layout()
        shutil.rmtree(self.root / "tmp", ignore_errors=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run directory for this process; a second runner is refused with the holder's PID."""
        path = self.root / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RunDirError(f"{path}: cannot be used as the run's lock file ({exc.strerror}); a run directory's "
                              ".lock is a plain file") from None
        with os.fdopen(fd, "r+") as lock:
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


def read_record(path: Path) -> CaseResult:
    """The record in ``path``; ValueError (with the reason) when it is not one, including when its key is not its
    file name. The one rule for every command that reads records (run, report, export, compare)."""
    if path.is_symlink():
        raise ValueError("the record is a link, not a file")
    try:
        record = CaseResult.from_json(path.read_text())
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason})") from None
    if record.key != path.stem:
        raise ValueError(f"the record's key {record.key!r} is not its file name")
    return record
